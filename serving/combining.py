"""Work done one group at a time by the threads that asked for it (flat combining).

A caller of :meth:`Combiner.run` queues its entry; if no group is running it leads: it takes everything
queued meanwhile (its own entry included) and runs it with one ``run_group`` call, then wakes the others,
who find their results. Under load one thread at a time does the work and entries that arrived together
share one call (one fsync for the history store's writes, no handler threads contending for the GIL inside
the numpy steps); a lone caller runs its own work at once, with no hand-off to another thread.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class Entry:
    """One caller's work in a group: ``run_group`` sets ``result`` or ``error`` on it."""

    __slots__ = ("payload", "result", "error", "lead", "_wake")

    def __init__(self, payload):
        self.payload = payload
        self.result = None
        self.error: BaseException | None = None
        self.lead = False  # handed the next group by the previous leader
        self._wake = threading.Lock()  # held until the entry is done or leads: its caller waits on it
        self._wake.acquire()


class Combiner:
    def __init__(self, run_group: Callable[[list[Entry]], None], *, timeout_s: float | None = None,
                 on_timeout: Callable[[], Exception] | None = None):
        """``run_group(entries)``: does every entry's work, in order, setting each one's result or error (an
        exception it raises fails the whole group); ``timeout_s``: how long a caller waits for its
        group to start before ``on_timeout()`` is raised (None: as long as it takes)."""
        self._run_group = run_group
        self._timeout_s = timeout_s
        self._on_timeout = on_timeout
        self._lock = threading.Lock()
        self._running = False
        self._queue: list[Entry] = []

    def run(self, payload) -> Any:
        """``payload``'s result once its group ran (or the error ``run_group`` set for it)."""
        entry = Entry(payload)
        with self._lock:
            self._queue.append(entry)
            entry.lead = not self._running
            self._running = True
        if not entry.lead:
            self._wait(entry)
        if entry.lead:
            self._lead()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _wait(self, entry: Entry) -> None:
        """Until ``entry`` is done or leads; ``on_timeout()`` if no group took it within the timeout."""
        # One lock per waiter, released by whoever finishes or hands over to it: a group's end wakes only
        # the next leader and its own entries, not every waiting thread.
        if entry._wake.acquire(timeout=-1 if self._timeout_s is None else self._timeout_s):
            return
        with self._lock:
            if entry in self._queue and not entry.lead:
                self._queue.remove(entry)
                raise self._on_timeout()
        entry._wake.acquire()  # a leader took it (or handed it the lead) meanwhile

    def _lead(self) -> None:
        """Run everything queued now as one group, then hand the lead to the first entry queued meanwhile."""
        with self._lock:
            group, self._queue = self._queue, []
        try:
            self._run_group(group)
        except BaseException as exc:
            for other in group:
                other.result, other.error = None, exc
        with self._lock:
            if self._queue:
                self._queue[0].lead = True
                self._queue[0]._wake.release()
            else:
                self._running = False
        for other in group:
            other.lead = False
            if other._wake.locked():
                other._wake.release()

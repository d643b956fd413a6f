"""Users' attention states, kept between RecommendForUser calls: an LRU bounded in bytes.

A cached state is tied to the exact stored history it was computed from by that history's
:class:`~serving.history_store.Cursor` (the sequence numbers of its first event and one past its last).
A call reads from the store only the events after the cursor, and continues the state with them, while
the stored history still begins at the cursor's first event; otherwise (events dropped by
``--max-events-per-user``, an erasure, in this process or another) the store returns the whole history
and the state is rebuilt from it. Events another process appended are simply among those read. So a
state never answers for a history it was not computed from, and one made by another model version is
never continued (see :meth:`sasrec.recommender.Recommender.advance_states`).

Erasure: :meth:`StateCache.evict` drops the user's state, and a state computed by a call that
started before the eviction is not stored afterwards (it would bring the erased events back).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from sasrec.recommender import AttentionState
from serving.history_store import Cursor

# Per-entry bookkeeping beyond the arrays (dict slot, tuple, ints), counted against --state-cache-bytes.
ENTRY_OVERHEAD_BYTES = 400
RECENT_EVICTIONS_KEPT = 100_000  # evictions remembered to refuse states of calls that started before them


@dataclass(frozen=True)
class CachedState:
    state: AttentionState
    cursor: Cursor  # of the stored history the state was computed from

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + ENTRY_OVERHEAD_BYTES


class StateCache:
    """Thread-safe LRU of :class:`CachedState` by user id, at most ``max_bytes`` in all (0: keeps nothing)."""

    def __init__(self, max_bytes: int, metrics=None):
        self.max_bytes = max_bytes
        self._metrics = metrics
        self._entries: OrderedDict[str, CachedState] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._clock = 0  # counts begin() and evict() calls
        self._evicted_at: OrderedDict[str, int] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def begin(self) -> int:
        """A token taken before reading the store; :meth:`put` refuses it once the user was evicted since."""
        with self._lock:
            self._clock += 1
            return self._clock

    def get(self, user_id: str) -> CachedState | None:
        """The user's cached state and its cursor (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(user_id)
            if entry is not None:
                self._entries.move_to_end(user_id)
        return entry

    def put(self, user_id: str, state: AttentionState, cursor: Cursor, token: int) -> bool:
        """Keep ``state``, computed from the stored history at ``cursor``, unless ``user_id`` was evicted after
        ``token`` was taken or the state alone exceeds the budget; the least recently used states make room."""
        entry = CachedState(state, cursor)
        with self._lock:
            evicted = self._evicted_at.get(user_id)
            forgotten = len(self._evicted_at) >= RECENT_EVICTIONS_KEPT and token <= next(iter(self._evicted_at.values()))
            if (evicted is not None and evicted >= token) or forgotten or entry.nbytes > self.max_bytes:
                return False
            self._drop(user_id)
            self._entries[user_id] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._report()
        return True

    def evict(self, user_id: str) -> None:
        """Forget the user's state (erasure): now, and for calls that started before."""
        with self._lock:
            self._clock += 1
            self._evicted_at.pop(user_id, None)
            self._evicted_at[user_id] = self._clock
            while len(self._evicted_at) > RECENT_EVICTIONS_KEPT:
                self._evicted_at.popitem(last=False)
            self._drop(user_id)
            self._report()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._report()

    def _drop(self, user_id: str) -> None:
        entry = self._entries.pop(user_id, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def _report(self) -> None:
        if self._metrics is not None:
            self._metrics.state_cache_bytes.set(self._bytes)
            self._metrics.state_cache_states.set(len(self._entries))

"""Version folders, warm-up and hot swap.

The store watches a model base (``models/NAME/<N>/``, as TensorFlow Serving lays it out). When a
version newer than the one serving appears, it is loaded and warmed in the watcher thread while the
old one keeps answering, then swapped in with one reference assignment: requests already batched
finish on the old model, later batches use the new one, nothing fails. A version that does not load
(broken, partial, wrong format) is logged and skipped until its folder changes; the old version
keeps serving. Hidden temporary folders of an export in progress are not integer names and are
never considered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from sasrec.export import list_versions

log = logging.getLogger("serving.model_store")


def _fingerprint(folder: Path) -> tuple:
    """Changes when the folder's content is (re)written, so a fixed broken version is retried."""
    stamps = []
    for sub in (folder, folder / "saved_model.pb", folder / "variables", folder / "assets"):
        try:
            st = sub.stat()
            stamps.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class ModelStore:
    def __init__(
        self,
        model_base: str | os.PathLike,
        *,
        loader: Callable | None = None,
        max_batch_size: int = 64,
        poll_interval_s: float = 5.0,
        metrics=None,
        on_change: Callable | None = None,
    ):
        self.base = Path(model_base)
        self.poll_interval_s = poll_interval_s
        self._max_batch_size = max_batch_size
        self._metrics = metrics
        self._on_change = on_change
        self._failed: dict[int, tuple] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.current = None  # the serving Recommender, swapped atomically
        if loader is None:
            from sasrec.recommender import Recommender

            loader = Recommender.load
        self._loader = loader

    def get(self):
        return self.current

    @property
    def version(self) -> int | None:
        model = self.current
        return None if model is None else model.version

    def poll(self) -> bool:
        """Load the newest good version above the serving one; True when a new version was swapped in."""
        with self._lock:
            current = self.version or 0
            for version in reversed(list_versions(self.base)):
                if version <= current:
                    break
                folder = self.base / str(version)
                fingerprint = _fingerprint(folder)
                if self._failed.get(version) == fingerprint:
                    continue
                start = time.perf_counter()
                try:
                    model = self._loader(folder)
                    model.warm_up(self._max_batch_size)
                except Exception as exc:  # anything wrong with a version must not stop serving
                    self._failed[version] = fingerprint
                    log.error("skipping model version %s at %s: %s: %s", version, folder, type(exc).__name__, exc)
                    if self._metrics is not None:
                        self._metrics.model_loads.labels("failed").inc()
                    continue
                self._failed.pop(version, None)
                old = self.current
                self.current = model
                log.info(
                    "serving model version %s (was %s), loaded and warmed in %.1f s",
                    version, old.version if old else None, time.perf_counter() - start,
                )
                if self._metrics is not None:
                    self._metrics.model_loads.labels("ok").inc()
                    self._metrics.model_version.set(version)
                if self._on_change is not None:
                    self._on_change(model)
                return True
            return False

    def start(self) -> None:
        """Poll now (in the background) and every ``poll_interval_s``."""
        self._thread = threading.Thread(target=self._watch, name="model-store", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:
                log.exception("model base poll failed")
            self._stop.wait(self.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

"""Version folders, warm-up and hot swap.

The store watches a model base (``models/NAME/<N>/``, as TensorFlow Serving lays it out). When a
version newer than the one serving appears, it is loaded and warmed in the watcher thread while the
old one keeps answering, then swapped in with one reference assignment: requests already batched
finish on the old model, later batches use the new one, nothing fails. A version that does not load
(broken, partial, wrong format) is logged and skipped until its folder changes; the old version
keeps serving. Hidden temporary folders of an export in progress are not integer names and are
never considered; a version folder that resolves outside the model base (a symlink) is refused.

If the model base disappears or becomes unreadable, the loaded version keeps serving from memory:
the store logs a warning once, sets ``sasrec_model_base_available`` to 0 and ``base_error`` to the
reason, and logs again when the base is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from sasrec.model_base import list_versions, version_fingerprint

log = logging.getLogger("serving.model_store")


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
        self.base_error: str | None = None  # why the model base cannot be read, None when it can
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

    def _list(self) -> list[int]:
        """The base's versions; a missing or unreadable base is reported (once) and lists nothing."""
        error = None
        try:
            if not self.base.is_dir():
                error = "missing" if not self.base.exists() else "not a folder"
            else:
                versions = list_versions(self.base)
        except OSError as exc:
            error = f"unreadable ({exc.strerror or exc})"
        if error != self.base_error:
            serving = self.version
            if error is not None:
                log.warning(
                    "model base %s is %s: %s", self.base, error,
                    f"still serving version {serving} from memory" if serving else "no model loaded",
                )
            elif self.base_error is not None:
                log.info("model base %s is readable again", self.base)
            self.base_error = error
            if self._metrics is not None:
                self._metrics.model_base_available.set(0 if error else 1)
        return [] if error else versions

    def _inside_base(self, folder: Path) -> bool:
        try:
            return folder.resolve(strict=True).is_relative_to(self.base.resolve(strict=True))
        except (OSError, RuntimeError):  # vanished meanwhile, or a symlink loop
            return False

    def poll(self) -> bool:
        """Load the newest good version above the serving one; True when a new version was swapped in."""
        with self._lock:
            current = self.version or 0
            for version in reversed(self._list()):
                if version <= current:
                    break
                folder = self.base / str(version)
                fingerprint = version_fingerprint(folder)
                if self._failed.get(version) == fingerprint:
                    continue
                if not self._inside_base(folder):
                    self._failed[version] = fingerprint
                    log.error("skipping model version %s: %s resolves outside the model base %s",
                              version, folder, self.base)
                    if self._metrics is not None:
                        self._metrics.model_loads.labels("failed").inc()
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

"""The model base: the contract between export and everything that serves a model.

A model base is a folder of immutable integer versions, as TensorFlow Serving lays them out::

    models/NAME/
        1/                      a SavedModel (saved_model.pb, variables/) with
            assets/model_card.json
        2/
        .2.tmp-XXXX/            an export in progress: hidden, never a version

A version appears only complete (written beside the base, then renamed). Its ``serving_default``
signature is the one rule for histories (see :mod:`sasrec.export`), and its model card
(``assets/model_card.json``, format ``sasrec-model-card/1``) holds ``maxlen``, ``max_k``,
``num_items``, the ``sequence_widths`` the signature pads batches to, the config, the data manifest,
the metrics with their protocol and the popularity ranking. This module is the only one that knows
this layout; :mod:`sasrec.export` writes versions, :class:`sasrec.recommender.Recommender` and the
server's model store read them. It imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipelines.errors import InputError

SIGNATURE = "serving_default"
# Live-history signatures (sasrec.export): a user's attention state, encoded once and then advanced.
ENCODE_SIGNATURE = "encode_state"
ADVANCE_SIGNATURE = "advance_state"
# The recommendations of serving_default plus, per returned item, the history items that drove it.
EXPLAIN_SIGNATURE = "explain"
# serving_default with the events' timestamps: exported only by time_bias models (card: "time_bias").
TIMED_SIGNATURE = "recommend_timed"
# encode_state / advance_state with the events' timestamps: likewise only time_bias models.
ENCODE_TIMED_SIGNATURE = "encode_state_timed"
ADVANCE_TIMED_SIGNATURE = "advance_state_timed"
MODEL_CARD = "model_card.json"
CARD_FORMAT = "sasrec-model-card/1"
_VERSION_RE = re.compile(r"^[0-9]+$")


def list_versions(model_base: str | os.PathLike) -> list[int]:
    """Integer version folders under ``model_base``, ascending (hidden temporary folders excluded).

    Only canonical decimal names count (``3``, not ``03``, ``3.tmp`` or ``3\\n``), so a version number
    always names exactly one folder."""
    base = Path(model_base)
    if not base.is_dir():
        return []
    return sorted(
        int(p.name) for p in base.iterdir() if _VERSION_RE.fullmatch(p.name) and str(int(p.name)) == p.name and p.is_dir()
    )


def new_version_folder(model_base: str | os.PathLike, version: int | None = None) -> Path:
    """The folder of a new version: ``version``, or the newest + 1; an existing version is never reused."""
    base = Path(model_base)
    if version is None:
        version = (list_versions(base) or [0])[-1] + 1
    if version < 1:
        raise InputError(f"--version must be >= 1, got {version}")
    target = base / str(version)
    if target.exists():
        raise InputError(f"{target} already exists; versions are immutable, pick another --version")
    return target


def resolve_version(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``path`` is a version folder (holds ``saved_model.pb``) or a model base (newest integer version)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found (give a model base or a version folder from `sasrec export`)")
    if (path / "saved_model.pb").is_file():
        return path, int(path.name) if path.name.isdigit() else None
    versions = list_versions(path)
    if not versions:
        raise InputError(f"{path}: neither a SavedModel nor a model base with integer version folders")
    return path / str(versions[-1]), versions[-1]


def version_fingerprint(folder: str | os.PathLike) -> tuple:
    """Changes when a version folder's content is (re)written, so a fixed broken version is retried."""
    folder = Path(folder)
    stamps = []
    for sub in (folder, folder / "saved_model.pb", folder / "variables", folder / "assets"):
        try:
            st = sub.stat()
            stamps.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


def card_path(version_dir: str | os.PathLike) -> Path:
    return Path(version_dir) / "assets" / MODEL_CARD


def read_card(version_dir: str | os.PathLike) -> dict:
    path = card_path(version_dir)
    if not path.is_file():
        raise InputError(f"{version_dir}: no assets/{MODEL_CARD}; export it with `sasrec export`")
    return json.loads(path.read_text())


def sequence_widths(maxlen: int, smallest: int = 16, count: int = 3) -> list[int]:
    """Widths a batch is padded to, ascending: ``maxlen`` halved (rounding up) while the half stays
    >= ``smallest``, at most ``count`` of them.

    Few widths, since an XLA signature compiles once per (batch size, width) and a server warms them
    all: maxlen 200 gives 50, 100, 200. The model's cost grows faster than linearly with the width,
    so batches of short histories gain most (figures: BENCHMARKS.md, section batch)."""
    widths = [int(maxlen)]
    while len(widths) < count and (widths[-1] + 1) // 2 >= smallest:
        widths.append((widths[-1] + 1) // 2)
    return widths[::-1]

"""Download MovieLens archives from GroupLens with checksum verification, cache and atomic writes.

``DIR/NAME.zip`` is the cached archive (kept only when its checksum matched) and ``DIR/NAME/`` the
extracted files; both appear only complete. The checksums are the MD5 values GroupLens publishes
beside each archive (``<url>.md5``). ``ml-latest-small`` is re-released in place, so it has no
pinned checksum: its published ``.md5`` file is fetched and checked at download time instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from pipelines.atomic import atomic_directory, atomic_file
from pipelines.errors import InputError

BASE_URL = "https://files.grouplens.org/datasets/movielens/"
BASE_URL_ENV = "SASREC_DOWNLOAD_BASE_URL"
# name -> published MD5 of NAME.zip (from https://files.grouplens.org/datasets/movielens/NAME.zip.md5),
# None: fetch the published .md5 file at download time.
CHECKSUMS_MD5: dict[str, str | None] = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-latest-small": None,
}
CHUNK = 1 << 20


def download(
    name: str,
    directory: str | Path,
    *,
    base_url: str | None = None,
    sha256: str | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Path:
    """Fetch ``NAME.zip`` into ``directory`` (unless a verified copy is cached), extract it and return
    the extracted folder. ``sha256`` replaces the published MD5 as the expected checksum; ``base_url``
    (or the ``SASREC_DOWNLOAD_BASE_URL`` variable) replaces the GroupLens address."""
    if name not in CHECKSUMS_MD5:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(CHECKSUMS_MD5)}")
    base = (base_url or os.environ.get(BASE_URL_ENV) or BASE_URL).rstrip("/") + "/"
    url = f"{base}{name}.zip"
    directory = Path(directory)
    archive = directory / f"{name}.zip"
    if sha256:
        algorithm, expected = "sha256", sha256.lower()
    else:
        algorithm, expected = "md5", CHECKSUMS_MD5[name] or _published_md5(url)
    if force or not (archive.is_file() and _digest(archive, algorithm) == expected):
        _fetch(url, archive, algorithm, expected, progress)
    target = directory / name
    if force or not target.is_dir():
        with zipfile.ZipFile(archive) as zf, atomic_directory(target) as tmp:
            zf.extractall(tmp)
            entries = list(tmp.iterdir())
            if len(entries) == 1 and entries[0].is_dir():  # GroupLens zips hold one folder named like the archive
                for entry in entries[0].iterdir():
                    entry.rename(tmp / entry.name)
                entries[0].rmdir()
    return target


def _fetch(url: str, archive: Path, algorithm: str, expected: str, progress: bool | None) -> None:
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_file(archive) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=archive.name, disable=None if progress is None else not progress) as bar:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != expected:
                raise InputError(
                    f"{url}: {algorithm} checksum mismatch (expected {expected}, got {digest.hexdigest()}); nothing was kept"
                )
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from None


def _published_md5(url: str) -> str:
    try:
        with urllib.request.urlopen(url + ".md5", timeout=60) as response:
            text = response.read(4096).decode("ascii", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(f"{url}.md5: cannot fetch the published checksum: {getattr(exc, 'reason', exc)}") from None
    found = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not found:
        raise InputError(f"{url}.md5: no MD5 checksum in {text[:100]!r}")
    return found.group().lower()


def _digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

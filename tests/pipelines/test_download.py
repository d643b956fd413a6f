from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from pipelines.download import download


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server for a folder; ``server.hits`` lists the requested paths."""
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.root, httpd.hits, httpd.url = root, hits, f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def movielens_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t10\t5\t100\n1\t11\t4\t101\n")
        zf.writestr("ml-100k/README", "test archive")
    return buf.getvalue()


def test_download_verify_extract_and_cache(server, tmp_path, cli):
    data = movielens_zip()
    (server.root / "ml-100k.zip").write_bytes(data)
    code, out, err = cli("download", "ml-100k", "--dir", tmp_path / "data", "--base-url", server.url,
                         "--sha256", hashlib.sha256(data).hexdigest())
    assert code == 0, err
    assert (tmp_path / "data" / "ml-100k" / "u.data").read_text().startswith("1\t10")
    assert (tmp_path / "data" / "ml-100k.zip").read_bytes() == data
    assert server.hits == ["/ml-100k.zip"]
    code, _, err = cli("download", "ml-100k", "--dir", tmp_path / "data", "--base-url", server.url,
                       "--sha256", hashlib.sha256(data).hexdigest())
    assert code == 0 and server.hits == ["/ml-100k.zip"]  # cache hit: the server was not asked again


def test_published_md5_sidecar_and_env_base_url(server, tmp_path, monkeypatch):
    data = movielens_zip()
    (server.root / "ml-latest-small.zip").write_bytes(data)
    (server.root / "ml-latest-small.zip.md5").write_text(f"MD5 (ml-latest-small.zip) = {hashlib.md5(data).hexdigest()}\n")
    monkeypatch.setenv("SASREC_DOWNLOAD_BASE_URL", server.url)
    target = download("ml-latest-small", tmp_path / "data", progress=False)
    assert (target / "u.data").is_file()


def test_checksum_mismatch_is_a_clean_error_and_leaves_nothing(server, tmp_path, cli):
    (server.root / "ml-1m.zip").write_bytes(movielens_zip())
    code, _, err = cli("download", "ml-1m", "--dir", tmp_path / "data", "--base-url", server.url, "--sha256", "0" * 64)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "checksum mismatch" in err and "Traceback" not in err
    assert list((tmp_path / "data").iterdir()) == []
    # the published MD5 of the real ml-1m.zip does not match the test archive either
    code, _, err = cli("download", "ml-1m", "--dir", tmp_path / "data", "--base-url", server.url)
    assert code == 2 and "md5 checksum mismatch" in err and list((tmp_path / "data").iterdir()) == []


def test_missing_file_on_server_is_a_clean_error(server, tmp_path, cli):
    code, _, err = cli("download", "ml-20m", "--dir", tmp_path / "data", "--base-url", server.url)
    assert code == 2 and "download failed" in err and "Traceback" not in err

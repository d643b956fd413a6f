"""The client-only distribution (clients/python -> sasrec-service-client) installs and works without TensorFlow."""

from __future__ import annotations

import email
import os
import re
import socket
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "clients" / "python"
CLIENT_FILES = {
    "sasrec/__init__.py",
    "sasrec/v1/__init__.py",
    "sasrec/v1/recommender_pb2.py",
    "sasrec/v1/recommender_pb2.pyi",
    "sasrec/v1/recommender_pb2_grpc.py",
    "serving/__init__.py",
    "serving/client.py",
}
HEAVY = ("tensorflow", "keras", "jax", "pandas", "numpy")

# Runs in a fresh interpreter: heavy frameworks cannot be imported at all, the unpacked wheel comes first.
PROBE = """
import sys
BLOCKED = {"tensorflow", "keras", "jax", "pandas"}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the client must not need it")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[1])
import serving.client
from sasrec.v1 import recommender_pb2
client = serving.client.RecommenderClient(f"127.0.0.1:{sys.argv[2]}", timeout=1.0)
print(client.health())
client.close()
print(serving.client.__file__)
print(recommender_pb2.__file__)
print(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def build_client_wheel(tmp_path: Path) -> Path:
    """``pip wheel`` of clients/python, offline; setuptools' build and egg-info folders go to tmp_path
    (DIST_EXTRA_CONFIG), so the tree stays clean and no stale build/lib file from an earlier build leaks in."""
    extra_cfg = tmp_path / "build.cfg"
    extra_cfg.write_text(f"[build]\nbuild_base = {tmp_path / 'build'}\n[egg_info]\negg_base = {tmp_path}\n")
    env = {**os.environ, "DIST_EXTRA_CONFIG": str(extra_cfg), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         str(CLIENT), "-w", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=120,
    )
    (wheel,) = out.glob("sasrec_service_client-*.whl")
    return wheel


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_pins_match_the_service():
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["dependencies"]
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert client and set(client) <= set(service)


def test_client_wheel_installs_and_runs_without_tensorflow(tmp_path):
    wheel = build_client_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(metadata_name))
        site = tmp_path / "site"
        zf.extractall(site)

    assert metadata["Name"] == "sasrec-service-client"
    requires = metadata.get_all("Requires-Dist") or []
    assert {re.match(r"[A-Za-z0-9._-]+", r)[0].lower() for r in requires} == {
        "grpcio", "grpcio-health-checking", "protobuf"}
    assert not [r for r in requires if any(h in r.lower() for h in HEAVY)], requires
    assert {n for n in names if ".dist-info/" not in n} == CLIENT_FILES

    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(site), str(unused_port())],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    health, client_file, pb2_file, heavy = out.stdout.strip().splitlines()
    assert health == "UNREACHABLE"
    assert Path(client_file).resolve().is_relative_to(site.resolve())
    assert Path(pb2_file).resolve().is_relative_to(site.resolve())
    assert heavy == "[]"

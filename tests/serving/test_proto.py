"""The committed generated code is exactly what grpc_tools makes of the proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path):
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", "protos", f"--python_out={tmp_path}",
           f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "protos/sasrec/v1/recommender.proto"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "sasrec" / "v1" / name).read_bytes()
        committed = (ROOT / "sasrec" / "v1" / name).read_bytes()
        assert fresh == committed, (
            f"sasrec/v1/{name} is stale: run `make protos`"
        )


def test_importing_sasrec_stays_cheap():
    code = "import sys, sasrec, sasrec.cli, sasrec.v1.recommender_pb2; sasrec.cli.build_parser(); " \
           "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"

"""docker-compose.yml is checked without a Docker engine: services, ports, volumes, health checks, and
every `sasrec ...` command it runs parses with the real CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from sasrec.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def sasrec_commands(command, env: dict | None = None) -> list[list[str]]:
    """The `sasrec ...` invocations of a compose command (exec list, or `sh -c SCRIPT`), with shell
    variables replaced by the service's environment (others by a placeholder path)."""
    env = dict(env or {})
    if isinstance(command, str):
        command = shlex.split(command)
    if command[:1] == ["sasrec"]:
        return [command[1:]]
    if command[:2] == ["sh", "-c"]:
        found = []
        for match in re.finditer(r"(?:^|[;&|\n]|then|else)\s*sasrec\s+([^;&|\n]*)", command[2]):
            text = re.sub(r"\$\$(\w+)", lambda m: str(env.get(m.group(1), f"/placeholder/{m.group(1)}")), match.group(1))
            found.append(shlex.split(text))
        return found
    return []


def test_services_ports_volumes(compose):
    services = compose["services"]
    assert {"train", "train-gpu", "recommender"} <= set(services)
    rec = services["recommender"]
    assert {"8500:8500", "9090:9090"} <= set(rec["ports"])
    assert "models:/models:ro" in rec["volumes"]
    assert any(v.startswith("models:/models") for v in services["train"]["volumes"])
    assert "models" in compose["volumes"]
    assert services["train-gpu"]["profiles"] == ["gpu"]
    devices = services["train-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "Dockerfile", name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_recommender_healthcheck_uses_grpc_health(compose):
    rec = compose["services"]["recommender"]
    test = rec["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "serving.client"]
    from serving.client import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert test[4] == "health" and test[5].endswith(":8500")
    # The drain grace period fits in the time compose waits after SIGTERM.
    serve = sasrec_commands(rec["command"])[0]
    grace = float(serve[serve.index("--grace-period-s") + 1])
    assert grace < float(rec["stop_grace_period"].rstrip("s"))


def test_every_command_exists_in_the_cli(compose):
    parser = build_parser()
    seen = set()
    for name, service in compose["services"].items():
        for argv in sasrec_commands(service["command"], service.get("environment")):
            args = parser.parse_args(argv)  # SystemExit(2) on an unknown command or flag
            seen.add(args.command)
    assert {"synth", "prepare", "train", "export", "serve"} <= seen


def test_server_flags_bind_all_interfaces_in_the_container(compose):
    argv = sasrec_commands(compose["services"]["recommender"]["command"])[0]
    args = build_parser().parse_args(argv)
    assert (args.host, args.port, args.metrics_port, args.model_base) == ("0.0.0.0", 8500, 9090, "/models/sasrec")
    train_script = compose["services"]["train"]["command"][2]
    assert "--model-base /models/sasrec" in train_script

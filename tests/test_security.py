"""Issue 10 item 8: placeholder passwords refused at start, what Flower leaves open, Redis behind a password."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from worker.credentials import (
    PLACEHOLDER_PASSWORDS,
    basic_auth_problems,
    is_placeholder,
    placeholder_problems,
    url_problem,
)

ROOT = Path(__file__).resolve().parents[1]
REAL = "7f3c9a1e5b2d4c6e8a0b1c2d"  # what `openssl rand -hex 12` gives: not a placeholder


def example_env() -> dict[str, str]:
    """The variables of .env.example, as compose would read them."""
    env = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def compose_env(source: dict[str, str]) -> dict[str, str]:
    """The secrets a Marco container sees under compose: .env itself (env_file) plus the URLs built from it."""
    return {
        **source,
        "MARCO_BROKER_URL": f"redis://:{source['REDIS_PASSWORD']}@redis:6379/0",
        "MARCO_DATABASE_URL": f"postgresql://marco_app:{source['MARCO_APP_DB_PASSWORD']}@postgres:5432/marco",
    }


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "FLOWER_", "MARCO_", "REDIS_"))}
    clean.update(env, PYTHONPATH=str(ROOT))
    return subprocess.run(args, capture_output=True, text=True, env=clean, cwd=ROOT, timeout=timeout)


def marco(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-c", "from marco.cli import main; main()", *args], env)


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long error lines


# --- the shared list --------------------------------------------------------------------------------------
def test_every_password_in_the_example_env_is_a_known_placeholder() -> None:
    env = example_env()
    assert is_placeholder(env["POSTGRES_PASSWORD"]) and is_placeholder(env["REDIS_PASSWORD"])
    assert basic_auth_problems(env["FLOWER_BASIC_AUTH"])
    problems = placeholder_problems(compose_env(env))
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "MARCO_BROKER_URL", "MARCO_DATABASE_URL",
                 "MARCO_APP_DB_PASSWORD", "MARCO_EXPLORER_DB_PASSWORD"):
        assert any(p.startswith(name) for p in problems), (name, problems)


@pytest.mark.parametrize("value", ["change-me", "CHANGE-ME", "changeme", "change-me-please", "password", "secret", " admin "])
def test_placeholders_are_recognised(value: str) -> None:
    assert is_placeholder(value)


@pytest.mark.parametrize("value", [REAL, "correct horse battery staple", "s3cret-pass", "marco-prod-2026-x"])
def test_real_passwords_pass(value: str) -> None:
    assert not is_placeholder(value)


def test_urls_are_read_for_their_password() -> None:
    assert "placeholder password 'change-me'" in url_problem("MARCO_BROKER_URL", "redis://:change-me@h:6379/0")
    assert url_problem("MARCO_DATABASE_URL", "postgresql+psycopg://marco:pass%77ord@db/marco")  # decoded: password
    assert url_problem("MARCO_DATABASE_URL", f"postgresql://marco:p%40{REAL}@db/marco") is None
    assert url_problem("MARCO_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/marco") is None  # trust auth
    assert url_problem("MARCO_BROKER_URL", f"rediss://:{REAL}@h:6379/0") is None
    assert url_problem("MARCO_DATABASE_URL", None) is None


def test_flower_basic_auth_needs_a_user_and_a_real_password_for_every_entry() -> None:
    assert basic_auth_problems(f"ops:{REAL}") == []
    assert basic_auth_problems(f"ops:{REAL},bob:{REAL}x") == []
    for bad in ("", "   ", "ops", "ops:", ":pw-" + REAL, f"ops:{REAL},bob:change-me"):
        assert basic_auth_problems(bad), bad
    for placeholder in PLACEHOLDER_PASSWORDS:
        assert basic_auth_problems(f"ops:{placeholder}"), placeholder


# --- the container entrypoint -----------------------------------------------------------------------------
def entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "worker.credentials", *command], env)


def test_entrypoint_refuses_the_example_env_and_names_every_placeholder() -> None:
    out = entrypoint(compose_env(example_env()), sys.executable, "-c", "print('started')")
    assert out.returncode == 2
    assert "started" not in out.stdout
    message = out.stderr
    assert message.startswith("marco: refusing to start with placeholder secrets")
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "MARCO_BROKER_URL", "MARCO_DATABASE_URL",
                 "MARCO_APP_DB_PASSWORD", "MARCO_EXPLORER_DB_PASSWORD"):
        assert name in message
    assert "openssl rand" in message
    assert REAL not in message


def test_entrypoint_refuses_one_placeholder_left_among_real_ones() -> None:
    env = {**example_env(), "POSTGRES_PASSWORD": REAL, "FLOWER_BASIC_AUTH": f"admin:{REAL}",
           "MARCO_APP_DB_PASSWORD": REAL + "a", "MARCO_EXPLORER_DB_PASSWORD": REAL + "e"}  # Redis's left
    out = entrypoint(compose_env(env), sys.executable, "-c", "print('started')")
    assert out.returncode == 2
    assert "REDIS_PASSWORD" in out.stderr and "POSTGRES_PASSWORD" not in out.stderr


def test_entrypoint_runs_the_command_with_real_secrets() -> None:
    env = {**example_env(), "POSTGRES_PASSWORD": REAL, "REDIS_PASSWORD": REAL + "r", "FLOWER_BASIC_AUTH": f"admin:{REAL}f",
           "MARCO_APP_DB_PASSWORD": REAL + "a", "MARCO_EXPLORER_DB_PASSWORD": REAL + "e"}
    out = entrypoint(compose_env(env), sys.executable, "-c", "import os; print('started', os.getpid())")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("started")
    missing = entrypoint(compose_env(env), "no-such-command-here")
    assert missing.returncode == 127 and "no-such-command-here" in missing.stderr


def test_dockerfile_starts_every_command_through_the_check() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "worker.credentials"]' in text


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_env_files_stay_out_of_git_but_the_example_does_not() -> None:
    def ignored(name: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT).returncode == 0

    assert ignored(".env") and ignored(".env.production")
    assert not ignored(".env.example")


# --- marco flower / worker / scheduler ------------------------------------------------------------------
UNREACHABLE_BROKER = "redis://127.0.0.1:1/0"  # nothing listens: a refusal must come before any connection


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("admin:change-me", "placeholder password 'change-me'"),
        ("admin:", "not user:password with both parts set"),
        ("", "Flower needs basic auth"),
        (f"admin:{REAL},ops:password", "placeholder password 'password'"),
    ],
)
def test_marco_flower_refuses_placeholder_or_empty_basic_auth(auth: str, expected: str) -> None:
    out = marco("flower", env={"MARCO_BROKER_URL": UNREACHABLE_BROKER, "FLOWER_BASIC_AUTH": auth})
    assert out.returncode == 1
    assert expected in one_line(out.stderr), out.stderr


def test_marco_flower_refuses_a_placeholder_given_as_a_flag() -> None:
    out = marco("flower", "--basic-auth", "root:changeme", env={"MARCO_BROKER_URL": UNREACHABLE_BROKER})
    assert out.returncode == 1
    assert "gives user 'root' the placeholder password 'changeme'" in one_line(out.stderr)


def test_marco_flower_refuses_a_placeholder_broker_password() -> None:
    out = marco("flower", env={"MARCO_BROKER_URL": "redis://:change-me@127.0.0.1:1/0", "FLOWER_BASIC_AUTH": f"ops:{REAL}"})
    assert out.returncode == 1
    assert "MARCO_BROKER_URL uses the placeholder password 'change-me'" in one_line(out.stderr)


def test_marco_worker_and_scheduler_refuse_placeholder_urls() -> None:
    env = {"MARCO_BROKER_URL": UNREACHABLE_BROKER, "MARCO_DATABASE_URL": "postgresql://marco:change-me@127.0.0.1:1/marco"}
    out = marco("worker", env=env)
    assert out.returncode == 1
    assert "MARCO_DATABASE_URL uses the placeholder password 'change-me'" in one_line(out.stderr)
    out = marco("scheduler", "--once", env=env)
    assert out.returncode == 1
    assert "MARCO_DATABASE_URL uses the placeholder password 'change-me'" in one_line(out.stderr)
    out = marco("scheduler", "--once", env={**env, "MARCO_BROKER_URL": "redis://:secret@127.0.0.1:1/0"})
    assert "MARCO_BROKER_URL uses the placeholder password 'secret'" in one_line(out.stderr)


# --- issue 17: no password in an error or a log line ------------------------------------------------------
SECRET = "Hunter2-9f8e7d6c"


@pytest.mark.parametrize("text", [
    f"cannot use database URL 'postgress://marco:{SECRET}@db:5432/marco'",
    f"redis://:{SECRET}@redis:6379/0 does not answer",
    f"amqp://guest:{SECRET}@rabbit// and postgresql+psycopg://u:{SECRET}@h/d",
    f"postgresql://marco:{SECRET}@with@at@db/marco",
])
def test_redact_masks_every_url_password(text: str) -> None:
    from marco.store.urls import redact

    masked = redact(text)
    assert SECRET not in masked and "***@" in masked
    assert redact("sqlite:///marco.db and postgresql://db/marco") == "sqlite:///marco.db and postgresql://db/marco"


def test_a_misspelt_database_url_never_shows_its_password() -> None:
    from marco.store import Store, StoreError

    with pytest.raises(StoreError) as err:
        Store.open(f"postgress://marco:{SECRET}@db:5432/marco")
    assert SECRET not in str(err.value) and "postgress://marco:***@db:5432/marco" in str(err.value)
    assert err.value.__cause__ is None or SECRET not in str(err.value.__cause__)
    for args in (["status", "--db", f"postgress://marco:{SECRET}@db/marco"], ["db", "check", "--db", f"postgress://marco:{SECRET}@db/marco"]):
        out = marco(*args, env={})
        assert out.returncode != 0 and SECRET not in out.stdout + out.stderr, out.stdout + out.stderr


def test_scheduler_and_worker_logs_never_show_a_url_password(tmp_path) -> None:
    """Real processes against unreachable services: what they print names the URL, masked."""
    env = {"MARCO_BROKER_URL": f"redis://:{SECRET}@127.0.0.1:1/0", "MARCO_DATABASE_URL": f"postgresql://marco:{SECRET}@127.0.0.1:1/marco"}
    out = marco("scheduler", "--once", env=env)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "127.0.0.1:1" in text and SECRET not in text, text
    out = marco("submit", "mgsm", "--limit", "1", "--model", "scripted", env={**env, "MARCO_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}"})
    text = out.stdout + out.stderr
    assert "127.0.0.1:1" in text and SECRET not in text, text


# --- real services -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_flower_2_2_leaves_metrics_and_healthcheck_open_and_guards_the_rest(redis_url, tmp_path) -> None:
    """Why compose publishes Flower on localhost only: basic auth does not cover every path."""
    from worker.harness import start_flower

    port = free_port()
    auth = ("ops", REAL)
    flower = start_flower({"MARCO_BROKER_URL": redis_url}, tmp_path, port, f"{auth[0]}:{auth[1]}")
    base = f"http://127.0.0.1:{port}"
    guarded = ["/", "/workers", "/tasks", "/broker", "/api/workers", "/api/tasks", "/api/task/types", "/api/queues/length"]
    try:
        opened = {path: httpx.get(base + path, timeout=30) for path in ("/metrics", "/healthcheck")}
        assert {p: r.status_code for p, r in opened.items()} == {"/metrics": 200, "/healthcheck": 200}
        assert "flower_events_total" in opened["/metrics"].text or "# HELP" in opened["/metrics"].text
        assert opened["/healthcheck"].text == "OK"
        for path in guarded:
            assert httpx.get(base + path, timeout=30).status_code == 401, path
            assert httpx.get(base + path, auth=(auth[0], "wrong"), timeout=30).status_code == 401, path
        assert httpx.post(f"{base}/api/task/async-apply/marco.reason", timeout=30).status_code == 401
        for path in ("/api/workers", "/api/task/types", "/"):
            assert httpx.get(base + path, auth=auth, timeout=60).status_code == 200, path
        # Listening on 127.0.0.1 only: another address of this host gets no answer.
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://{other}:{port}/healthcheck", timeout=5)
    finally:
        flower.stop()


@pytest.fixture()
def private_redis(tmp_path):
    """Our own redis-server with a password, on a free port, in a temp dir (the shared one is never touched)."""
    import redis

    port = free_port()
    password = REAL
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=port, password=password).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://:{password}@127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_real_worker_runs_a_batch_through_a_password_protected_redis(private_redis, pg_database, tmp_path) -> None:
    import redis

    from marco.search.base import SearchConfig
    from marco.store import Store
    from marco.tasks.base import Problem
    from scheduler.dispatch import CeleryDispatcher
    from scheduler.submit import SubmitRequest, submit
    from worker.harness import start_worker
    from worker.settings import QueueSettings

    port = urlsplit(private_redis).port
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()  # a client without the password gets nothing
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, password="wrong").ping()

    db = pg_database()
    store = Store.open(db)
    env = {"MARCO_BROKER_URL": private_redis, "MARCO_DATABASE_URL": db}
    worker = start_worker(env, tmp_path, name="authw", queues="reason")
    try:
        problems = [Problem("demo", "en", i, f"auth {i}: 40 + 2?", ("42",)) for i in range(3)]
        request = SubmitRequest(task="demo", configs=[SearchConfig(strategy="greedy", budget=64)], model="scripted", chunk=1)
        plan = submit(store, CeleryDispatcher(QueueSettings.from_env(env)), request, problems)
        deadline = time.monotonic() + 120
        while store.get_batch(plan.batch_id).status in ("queued", "running"):
            assert time.monotonic() < deadline, store.batch_progress(plan.batch_id).to_dict()
            time.sleep(0.2)
        assert store.get_batch(plan.batch_id).status == "done"
        assert {store.get_job(j).worker.split("@")[0] for j in plan.job_ids} == {"authw"}
        assert REAL not in worker.output()  # the broker URL is logged with its password masked
    finally:
        worker.stop()
        store.close()

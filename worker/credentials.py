"""Refuse to start with a placeholder password (the ones `.env.example` ships, and the usual suspects).

Compose cannot tell ``change-me`` from a real password (``${VAR:?}`` only catches an empty one), so every
Marco container starts through this module (the image's ``ENTRYPOINT``):

    python -m worker.credentials marco worker --queues reason

checks the secrets it finds in the environment, then ``exec``s the command; on a placeholder it prints what
to change and exits with status 2 before anything connects. ``marco worker``, ``marco scheduler`` and
``marco flower`` run the same checks on the URLs and the basic auth they use, so a host outside compose is
held to the same rule. An empty password in a URL is allowed (a local database with trust auth); an empty
Flower password is not (Flower is never started without a real one).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Mapping
from urllib.parse import unquote, urlsplit

# Lower-case. `.env.example` ships `change-me`; the rest are what people type when told to set a password.
PLACEHOLDER_PASSWORDS: frozenset[str] = frozenset(
    {
        "change-me", "changeme", "change_me", "change-this", "changethis", "replace-me", "replaceme",
        "password", "passw0rd", "pass", "pw", "secret", "s3cret", "admin", "example", "placeholder",
        "default", "test", "xxx", "xxxxxx", "todo", "123456", "12345678", "marco", "postgres", "redis",
        "flower", "a-long-password",
    }
)
PLACEHOLDER_PREFIXES: tuple[str, ...] = ("change-me", "changeme", "change_me", "replace-me", "<")

# Where a Marco process finds secrets: URLs with a password inside, and plain passwords.
URL_VARS: tuple[str, ...] = ("MARCO_BROKER_URL", "MARCO_DATABASE_URL")
PASSWORD_VARS: tuple[str, ...] = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "MARCO_APP_DB_PASSWORD", "MARCO_EXPLORER_DB_PASSWORD")
BASIC_AUTH_VAR = "FLOWER_BASIC_AUTH"

HOW_TO_FIX = "set real passwords in .env (e.g. `openssl rand -hex 24`) and start again"


class PlaceholderSecret(ValueError):
    """A secret is still the example's placeholder (or empty where one is required)."""


def is_placeholder(secret: str) -> bool:
    """True for a known placeholder (case-insensitive) such as ``change-me`` or ``password``."""
    value = secret.strip().lower()
    return value in PLACEHOLDER_PASSWORDS or value.startswith(PLACEHOLDER_PREFIXES)


def url_problem(name: str, url: str | None) -> str | None:
    """What is wrong with the password inside ``url`` (``redis://:PW@host``), or None."""
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None  # not a URL we can read; the process that uses it says why
    if password is not None and is_placeholder(unquote(password)):
        return f"{name} uses the placeholder password {unquote(password)!r}"
    return None


def basic_auth_problems(auth: str | None, name: str = BASIC_AUTH_VAR) -> list[str]:
    """Flower's ``user:password[,user2:password2]``: every pair needs a user and a real password."""
    if not auth or not auth.strip():
        return [f"{name} is empty: Flower needs basic auth (user:password)"]
    problems = []
    for pair in auth.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            problems.append(f"{name} entry {user.strip() or pair!r} is not user:password with both parts set")
        elif is_placeholder(password):
            problems.append(f"{name} gives user {user!r} the placeholder password {password!r}")
    return problems


def placeholder_problems(env: Mapping[str, str] | None = None, names: Iterable[str] | None = None) -> list[str]:
    """Every placeholder secret among ``names`` (default: all the variables above that are set) in ``env``."""
    env = os.environ if env is None else env
    wanted = set(names) if names is not None else None
    problems: list[str] = []

    def considered(name: str) -> bool:
        return (wanted is None or name in wanted) and name in env

    for name in URL_VARS:
        if considered(name):
            problem = url_problem(name, env[name])
            if problem:
                problems.append(problem)
    for name in PASSWORD_VARS:
        if considered(name) and is_placeholder(env[name]):
            problems.append(f"{name} is the placeholder {env[name]!r}")
    if considered(BASIC_AUTH_VAR):
        problems.extend(basic_auth_problems(env[BASIC_AUTH_VAR]))
    return problems


def refusal(problems: list[str]) -> str:
    """One message naming every problem and what to do."""
    return "refusing to start with placeholder secrets: " + "; ".join(problems) + f". {HOW_TO_FIX}"


def refuse_placeholders(env: Mapping[str, str] | None = None, names: Iterable[str] | None = None) -> None:
    """Raise :class:`PlaceholderSecret` when :func:`placeholder_problems` finds any."""
    problems = placeholder_problems(env, names)
    if problems:
        raise PlaceholderSecret(refusal(problems))


def main(argv: list[str] | None = None) -> int:
    """Container entrypoint: check the environment, then ``exec`` the command (``marco --help`` without one)."""
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    problems = placeholder_problems()
    if problems:
        print(f"marco: {refusal(problems)}", file=sys.stderr)
        return 2
    command = command or ["marco", "--help"]
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"marco: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main())

"""Every command's --help renders: help texts hold specs such as ``server[+llamacpp]:http://HOST[/v1]``."""

from __future__ import annotations

import pytest
import typer.main
from typer.testing import CliRunner

from marco.cli import app


def command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():  # a group's subcommands
            walk(sub, [*path, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "marco")
def test_help_renders(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_the_model_spec_is_shown_as_written() -> None:
    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    assert "[/v1]" in result.output and "--fill" in result.output and "--widen" in result.output

"""The installed commands ([project.scripts]): each is on the PATH of the environment that
installed the package (the editable install, or the wheel in CI's clean virtual environment) and
answers ``--help``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
COMMANDS = {"siss-audit": "siss.audit.__main__:main"}


def test_the_commands_are_the_ones_declared():
    if not PYPROJECT.exists():  # the wheel's tests run from the sdist, which has it
        pytest.fail(f"{PYPROJECT} is missing")
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert declared == COMMANDS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_installed_command_answers_help(command):
    executable = Path(sys.executable).parent / command
    assert executable.exists(), f"{command} is not installed beside {sys.executable}"
    run = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: {command}"), run.stdout[:200]

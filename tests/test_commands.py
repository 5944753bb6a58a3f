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
COMMANDS = {
    "siss-audit": "siss.audit.__main__:main",
    "siss-stable-diffusion": "siss.stable_diffusion.cli:main",
}


def test_the_commands_are_the_ones_declared():
    if not PYPROJECT.exists():  # the wheel's tests run from the sdist, which has it
        pytest.fail(f"{PYPROJECT} is missing")
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert declared == COMMANDS


def installed_help(command: str) -> str:
    """``command --help`` run from the environment's scripts folder: its output (exit 0)."""
    executable = Path(sys.executable).parent / command
    assert executable.exists(), f"{command} is not installed beside {sys.executable}"
    run = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_installed_command_answers_help(command):
    text = installed_help(command)
    assert text.startswith(f"usage: {command}"), text[:200]


def test_the_stable_diffusion_command_offers_its_stages():
    """``siss-stable-diffusion [stage]``: the whole job (run) or one of its four stages."""
    text = installed_help("siss-stable-diffusion")
    assert "{run,generate,split,unlearn,verify}" in text, text[:2000]
    assert "siss-stable-diffusion split" in text  # the examples name the installed command

"""The Pythons the package declares are the ones CI tests (issue 24): the classifiers name
exactly the Python of ``.ci/run`` (3.11, the one with a CPU torch wheel on the CI machine), no
other Python is set up there, and ``requires-python``'s floor is that version. Not run from the
sdist (it has no ``.ci``)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
CI_PYTHON = "3.11"  # the machine's own Python, on which every step of .ci/run runs


def test_the_classifiers_name_the_tested_python_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    prefix = "Programming Language :: Python :: "
    declared = {
        c.removeprefix(prefix)
        for c in project["classifiers"]
        if c.startswith(prefix) and re.fullmatch(r"3\.\d+", c.removeprefix(prefix))
    }
    assert declared == {CI_PYTHON}
    assert project["requires-python"] == f">={CI_PYTHON}"
    ci = (ROOT / ".ci/run").read_text()
    assert not re.search(r"python3\.\d+|pyenv|--python", ci), "another Python in .ci/run"

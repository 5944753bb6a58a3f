"""``siss.stable_diffusion`` is the top floor of the package: an application on the library.

Nothing else in ``siss`` imports it, and it imports the library's floors below it only. Its
heavy dependencies (diffusers, accelerate, PEFT, transformers, matplotlib) are imported where
they are used, so importing the command line (and ``--help``) needs torch alone.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import siss

PACKAGE = Path(siss.__file__).parent
APPLICATION = PACKAGE / "stable_diffusion"
# What the job may import of siss: the core (the top level, siss.loop, siss.registry) and the
# floors below the applications.
BELOW = {
    "siss",
    "siss.loop",
    "siss.registry",
    "siss.recipe",
    "siss.stopping",
    "siss.adapters",
    "siss.audit",
    "siss.metrics",
    "siss._files",
    "siss._images",
    "siss._checks",
    "siss._cli",
    "siss._optional",
}


def siss_imports(path: Path) -> set[str]:
    """The ``siss`` modules ``path`` imports, at any depth of its code (deferred ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name == "siss" or name.startswith("siss.")}


def test_nothing_else_in_siss_imports_the_job():
    importers = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if APPLICATION not in path.parents
        and any(n.startswith("siss.stable_diffusion") for n in siss_imports(path))
    ]
    assert importers == []


def allowed(name: str) -> bool:
    """A module of the job itself, of a floor below it, or the top level ``siss``."""
    floors = (*(BELOW - {"siss"}), "siss.stable_diffusion")
    return name == "siss" or any(name == f or name.startswith(f + ".") for f in floors)


def test_the_job_imports_the_floors_below_it_only():
    above = {
        f"{path.name}: {name}"
        for path in APPLICATION.glob("*.py")
        for name in siss_imports(path)
        if not allowed(name)
    }
    assert above == set()
    assert not allowed("siss.sequential") and not allowed("siss.stable_diffusionx")


def test_the_command_line_loads_without_the_heavy_dependencies():
    code = (
        "import sys, siss.stable_diffusion.cli, siss.stable_diffusion.__main__\n"
        "heavy = ('diffusers', 'accelerate', 'peft', 'transformers', 'matplotlib')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

"""Every public object of ``siss``, ``siss.adapters``, ``siss.metrics`` and ``siss.audit`` carries
an ``Examples:`` section that runs as a doctest (issue 13: the API reference shows one per
object, as a code block: tests/docs/test_site.py).

"Public" is the package's ``__all__``. A class or function counts when ``doctest``'s own finder,
which ``pytest --doctest-modules`` uses over ``siss/``, finds at least one example in its
docstring (or its ``__init__``'s) in the module that defines it: so the example is shown on the
site AND run by the default test run. A constant's docstring is the string literal after its
assignment (what mkdocstrings shows), which ``doctest`` does not collect: this file runs those
examples itself.

Objects still without an example are listed in ``MISSING_EXAMPLES`` with the reason; they are
reported as expected failures (``-ra`` prints them with the reason in every run), so the gap stays
visible. An entry whose object has gained an example fails until it is removed from the list.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = (
    "siss",
    "siss.functional",
    "siss.loop",
    "siss.debug",
    "siss.adapters",
    "siss.metrics",
    "siss.audit",
    "siss.sequential",
)

# Public objects without a runnable example yet, and why (2026-11-23). Remove an entry when its
# example lands.
MISSING_EXAMPLES: dict[str, str] = {}


def public_names() -> list[str]:
    """``package.name`` for every name in each package's ``__all__``."""
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names += [f"{package}.{name}" for name in module.__all__]
    return names


def _split(qualified: str) -> tuple[ModuleType, str, object]:
    package, _, name = qualified.rpartition(".")
    module = importlib.import_module(package)
    return module, name, getattr(module, name)


def _defining_module(package: ModuleType, name: str) -> ModuleType:
    """The module a package re-exports ``name`` from (``from siss.x import name``)."""
    tree = ast.parse(Path(inspect.getfile(package)).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return importlib.import_module(node.module)
    return package  # defined in the package itself


def constant_docstring(module: ModuleType, name: str) -> str | None:
    """The string literal right after the module-level assignment of ``name``, if any."""
    tree = ast.parse(Path(inspect.getfile(module)).read_text(encoding="utf-8"))
    for statement, following in zip(tree.body, tree.body[1:], strict=False):
        if isinstance(statement, ast.Assign):
            targets = [t.id for t in statement.targets if isinstance(t, ast.Name)]
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            targets = [statement.target.id]
        else:
            continue
        if name in targets:
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                value = following.value.value
                return inspect.cleandoc(value) if isinstance(value, str) else None
            return None
    return None


def collected_examples(obj: object) -> int:
    """How many examples ``doctest``'s finder collects for ``obj`` from its defining module
    (the class docstring and its ``__init__``'s, not other methods')."""
    module = sys.modules[obj.__module__]
    tests = doctest.DocTestFinder().find(module, module.__name__)
    own = {f"{module.__name__}.{obj.__qualname__}"}
    if inspect.isclass(obj):
        own.add(f"{module.__name__}.{obj.__qualname__}.__init__")
    return sum(len(test.examples) for test in tests if test.name in own)


def is_constant(obj: object) -> bool:
    return not (inspect.isclass(obj) or inspect.isroutine(obj))


def example_count(qualified: str) -> int:
    package, name, obj = _split(qualified)
    if is_constant(obj):
        docstring = constant_docstring(_defining_module(package, name), name) or ""
        return len(doctest.DocTestParser().get_examples(docstring))
    return collected_examples(obj)


def test_the_allow_list_names_public_objects():
    unknown = sorted(set(MISSING_EXAMPLES) - set(public_names()))
    assert not unknown, f"MISSING_EXAMPLES names objects that are not public: {unknown}"


@pytest.mark.parametrize("qualified", public_names())
def test_public_object_has_a_runnable_example(qualified: str):
    count = example_count(qualified)
    if qualified in MISSING_EXAMPLES:
        assert count == 0, (
            f"{qualified} has an example now: remove it from MISSING_EXAMPLES in {__file__}"
        )
        pytest.xfail(f"no example yet: {MISSING_EXAMPLES[qualified]}")
    assert count > 0, (
        f"{qualified} has no `Examples:` with a `>>>` line in its docstring (for a constant: in "
        "the string literal after its assignment); add one, short and cheap, that runs as a doctest"
    )


def constant_names() -> list[str]:
    return [name for name in public_names() if is_constant(_split(name)[2])]


@pytest.mark.parametrize("qualified", constant_names())
def test_constant_examples_run(qualified: str):
    """``doctest`` does not collect the docstrings of constants: run them here, with the globals
    of their module, as ``pytest --doctest-modules`` runs the others."""
    package, name, _ = _split(qualified)
    module = _defining_module(package, name)
    docstring = constant_docstring(module, name)
    if not docstring or not doctest.DocTestParser().get_examples(docstring):
        pytest.skip(f"{qualified} has no example (test_public_object_has_a_runnable_example)")
    test = doctest.DocTestParser().get_doctest(
        docstring, dict(vars(module)), qualified, inspect.getfile(module), 0
    )
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)

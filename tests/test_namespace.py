"""The layout of the public namespace (issue 21, §3).

The top level holds what a training loop needs; the building blocks live in ``siss.functional``,
the loop helpers in ``siss.loop`` and the debug switches in ``siss.debug``. The names that left
the top level stay importable from ``siss`` until 0.3.0, each access with exactly one
``DeprecationWarning`` that names the new import, and give the very object of the new home.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings

import pytest

import siss

TOP_LEVEL = {
    # the losses
    "SISSLoss",
    "SISSNoISLoss",
    "NaiveDeletionLoss",
    "NegGradLoss",
    "EraseDiffLoss",
    "ReTrackLoss",
    "UnlearningLoss",
    # the result and draw types
    "LossTerms",
    "SISSDraw",
    "DenoisingDraw",
    "ReTrackDraw",
    "BalanceStats",
    "StepResult",
    # schedule, balancer, methods by name
    "NoiseSchedule",
    "NormBalancer",
    "make_loss",
    "METHODS",
    "RULES",
    "MethodRules",
    # the recipe
    "Unlearner",
    "UnlearningConfig",
    "teacher_for",
}

# Old top-level name -> its new home.
MOVED = {
    "importance_weights": "siss.functional",
    "log_density_ratio": "siss.functional",
    "DEFAULT_MAX_WEIGHT": "siss.functional",
    "mixture_sample": "siss.functional",
    "siss_terms": "siss.functional",
    "teacher_siss_terms": "siss.functional",
    "prediction_target": "siss.functional",
    "PREDICTION_TYPES": "siss.functional",
    "median_gradient_norm": "siss.functional",
    "paired_batches": "siss.loop",
    "rank_generator": "siss.loop",
    "BatchPlan": "siss.loop",
    "derived_seed": "siss.loop",
    "set_validate_values": "siss.debug",
    "validate_values_enabled": "siss.debug",
}

# Where each moved object is defined (the new namespaces only re-export).
DEFINED_IN = {
    "importance_weights": "siss.weights",
    "log_density_ratio": "siss.weights",
    "DEFAULT_MAX_WEIGHT": "siss.weights",
    "mixture_sample": "siss.sampler",
    "siss_terms": "siss.losses",
    "teacher_siss_terms": "siss.losses",
    "prediction_target": "siss.targets",
    "PREDICTION_TYPES": "siss.targets",
    "median_gradient_norm": "siss.balancer",
    "paired_batches": "siss.loop",
    "rank_generator": "siss.loop",
    "BatchPlan": "siss.loop",
    "derived_seed": "siss.loop",
    "set_validate_values": "siss._checks",
    "validate_values_enabled": "siss._checks",
}


def _deprecations(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, DeprecationWarning)]


def test_top_level_all_is_the_training_loop_set():
    assert len(siss.__all__) == len(set(siss.__all__)), "duplicates in siss.__all__"
    assert set(siss.__all__) == TOP_LEVEL
    assert isinstance(siss.__version__, str)


def test_top_level_names_resolve_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in siss.__all__:
            getattr(siss, name)
        namespace: dict[str, object] = {}
        exec("from siss import *", namespace)
    assert set(namespace) - {"__builtins__"} == TOP_LEVEL


def test_the_deprecation_table_is_the_documented_one():
    assert siss._MOVED == MOVED
    assert not set(MOVED) & TOP_LEVEL


@pytest.mark.parametrize("name", sorted(MOVED))
def test_new_home_holds_the_object_of_its_defining_module(name: str):
    home = importlib.import_module(MOVED[name])
    defined = importlib.import_module(DEFINED_IN[name])
    assert getattr(home, name) is getattr(defined, name)
    if hasattr(home, "__all__"):
        assert name in home.__all__


@pytest.mark.parametrize("module", ["siss.functional", "siss.debug"])
def test_new_namespaces_export_exactly_the_moved_names(module: str):
    home = importlib.import_module(module)
    assert set(home.__all__) == {name for name, where in MOVED.items() if where == module}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        namespace: dict[str, object] = {}
        exec(f"from {module} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(home.__all__)


def test_namespaces_are_attributes_after_import_siss():
    assert siss.functional.siss_terms is siss.losses.siss_terms
    assert siss.loop.paired_batches is siss.loop.paired_batches
    assert siss.debug.set_validate_values is siss._checks.set_validate_values


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_attribute_warns_once_and_gives_the_same_object(name: str):
    expected = getattr(importlib.import_module(MOVED[name]), name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = getattr(siss, name)
    assert value is expected
    deprecations = _deprecations(caught)
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    message = str(deprecations[0].message)
    assert message == (
        f"siss.{name} is deprecated and will be removed in 0.3.0: "
        f"use `from {MOVED[name]} import {name}`"
    )
    # Attributed to the caller's line, not to siss/__init__.py.
    assert deprecations[0].filename == __file__


@pytest.mark.parametrize("name", sorted(MOVED))
def test_old_from_import_warns_once_and_gives_the_same_object(name: str):
    expected = getattr(importlib.import_module(MOVED[name]), name)
    namespace: dict[str, object] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"from siss import {name}", namespace)
    assert namespace[name] is expected
    deprecations = _deprecations(caught)
    assert len(deprecations) == 1, [str(w.message) for w in caught]
    assert f"use `from {MOVED[name]} import {name}`" in str(deprecations[0].message)


def test_from_import_statement_warns_once():
    with pytest.warns(DeprecationWarning, match="from siss.loop import paired_batches") as record:
        from siss import paired_batches
    assert paired_batches is siss.loop.paired_batches
    assert len(_deprecations(record.list)) == 1


def test_from_import_of_several_names_warns_once_per_old_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from siss import BatchPlan, NoiseSchedule, importance_weights  # noqa: F401
    messages = sorted(str(w.message) for w in _deprecations(caught))
    assert len(messages) == 2
    assert "siss.BatchPlan" in messages[0] and "siss.importance_weights" in messages[1]


def test_unknown_attribute_is_an_attribute_error_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(siss, "no_such_name")
        with pytest.raises(AttributeError, match="'siss' has no attribute 'no_such_name'"):
            siss.no_such_name  # noqa: B018
        with pytest.raises(ImportError):
            exec("from siss import no_such_name", {})


def test_dir_lists_the_top_level_not_the_old_names():
    listed = set(dir(siss))
    assert TOP_LEVEL <= listed
    assert {"functional", "loop", "debug"} <= listed
    assert not set(MOVED) & listed


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_siss_does_not_import_diffusers():
    out = _run(
        """
        import sys
        import siss, siss.functional, siss.loop, siss.debug
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "accelerate")))
        """
    )
    assert out.strip() == "[]"


def test_import_siss_raises_no_deprecation_of_its_own():
    """The package's own imports go through the new homes, never through the old names."""
    out = _run(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import siss, siss.functional, siss.loop, siss.debug
        print([str(w.message) for w in caught if str(w.message).startswith("siss.")])
        """
    )
    assert out.strip() == "[]"

"""The distribution is ``siss-unlearn``; an unrelated ``siss`` installed beside it is named."""

import importlib.metadata
import warnings

import pytest

import siss
from siss import _distribution


def fake_distribution(folder, name: str, version: str, summary: str) -> None:
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: {summary}\n"
    )


def test_this_library_is_installed_as_siss_unlearn():
    assert importlib.metadata.version("siss-unlearn") == siss.__version__


def test_the_unrelated_siss_is_named_with_the_fix(tmp_path):
    fake_distribution(
        tmp_path, "siss", "1.2.1", "A command-line utility for applying artistic effects to videos"
    )
    with pytest.warns(RuntimeWarning, match=r"unrelated distribution named 'siss' \(1\.2\.1") as w:
        _distribution.warn_if_clashing([str(tmp_path)])
    assert "pip uninstall -y siss siss-unlearn && pip install siss-unlearn" in str(w[0].message)


def test_this_library_under_its_former_name_is_not_a_clash(tmp_path):
    fake_distribution(tmp_path, "siss", "0.2.0.dev0", "Data unlearning for diffusion models: x")
    fake_distribution(tmp_path, "siss-unlearn", "0.2.0", "Data unlearning for diffusion models")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _distribution.warn_if_clashing([str(tmp_path)])
    assert _distribution.clashing_distributions([str(tmp_path)]) == []

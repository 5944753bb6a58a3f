"""Every optional feature, with its package hidden, names the extra that installs it."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from siss import SISSLoss
from siss._optional import PACKAGES, needs


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` (and its loaded submodules) unimportable, as if not installed."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def use_diffusers(tmp_path: Path) -> None:
    from siss.adapters import loss_from_scheduler

    loss_from_scheduler(SISSLoss, DDPMScheduler())


def use_peft(tmp_path: Path) -> None:
    from siss.adapters.lora import lora_state_dict

    lora_state_dict(torch.nn.Linear(2, 2))


def use_safetensors(tmp_path: Path) -> None:
    from siss.audit.__main__ import _read_tensor

    _read_tensor(tmp_path / "images.safetensors")


def use_transformers(tmp_path: Path) -> None:
    from siss.audit.split import image_encoder_features

    (tmp_path / "config.json").write_text("{}")
    image_encoder_features(tmp_path)


def use_torchmetrics(tmp_path: Path) -> None:
    from siss.audit.membership import _auroc

    _auroc(torch.tensor([1.0, 2.0]), torch.tensor([0.5]))


def use_scipy(tmp_path: Path) -> None:
    from siss.metrics.rate import proportion_ci

    proportion_ci(1, 10, method="exact")


def use_torchdiffeq(tmp_path: Path) -> None:
    from siss.metrics.nll import log_likelihood

    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    log_likelihood(model, torch.zeros(1, 1, 2, 2), DDPMScheduler().alphas_cumprod)


def use_tqdm(tmp_path: Path) -> None:
    from siss.audit._models import progress_bar

    progress_bar(3, "steps", True)


def use_sklearn(tmp_path: Path) -> None:
    import numpy as np

    from siss.audit.split import _kmeans

    _kmeans(np.zeros((4, 2)), seed=0)


def use_matplotlib(tmp_path: Path) -> None:
    from siss.audit.figure import audit_figure

    audit_figure(None)


FEATURES = {
    "diffusers": use_diffusers,
    "peft": use_peft,
    "safetensors": use_safetensors,
    "transformers": use_transformers,
    "torchmetrics": use_torchmetrics,
    "scipy": use_scipy,
    "torchdiffeq": use_torchdiffeq,
    "tqdm": use_tqdm,
    "sklearn": use_sklearn,
    "matplotlib": use_matplotlib,
}


@pytest.mark.parametrize("package", sorted(FEATURES))
def test_a_hidden_package_names_its_extra(package, monkeypatch, tmp_path):
    distribution, extra = PACKAGES[package]
    hide(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError) as caught:
        FEATURES[package](tmp_path)
    message = str(caught.value)
    assert f"needs {distribution}, which is not installed" in message
    assert f'pip install "siss-unlearn[{extra}]"' in message
    assert caught.value.name.partition(".")[0] == package


def test_each_extra_named_is_declared_and_brings_its_package():
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("runs from the repository (the installed wheel has no pyproject.toml)")
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]

    def brings(extra: str) -> str:
        text = " ".join(extras[extra])
        nested = [
            e
            for name in extras[extra]
            if "[" in name
            for e in name[name.index("[") + 1 : name.index("]")].split(",")
        ]
        return text + " ".join(brings(e) for e in nested)

    for distribution, extra in PACKAGES.values():
        assert distribution.lower() in brings(extra).lower() or distribution == "Pillow", (
            distribution,
            extra,
        )


def test_other_missing_modules_are_not_renamed(monkeypatch):
    hide(monkeypatch, "pyarrow")
    with pytest.raises(ModuleNotFoundError) as caught, needs("reading parquet"):
        import pyarrow  # noqa: F401
    assert "siss-unlearn" not in str(caught.value)

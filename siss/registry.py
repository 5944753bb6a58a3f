"""Select an unlearning method by name, as examples and benchmarks do (paper, §5, Tables 1–2).

=============  ========================  =====================================================
name           class                     the paper's method
=============  ========================  =====================================================
``siss``       ``SISSLoss``              SISS (λ = 0.5 by default; ``lam=0.0`` / ``lam=1.0``
                                         give the λ = 0 and λ = 1 ablations)
``siss-nois``  ``SISSNoISLoss``          SISS (No IS), Eq. 4 with two forward passes' rows
``naive``      ``NaiveDeletionLoss``     naive deletion, Eq. 2
``neggrad``    ``NegGradLoss``           NegGrad, Eq. 3
``erasediff``  ``EraseDiffLoss``         EraseDiff with uniform-noise targets
=============  ========================  =====================================================
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from siss.baselines import EraseDiffLoss, NaiveDeletionLoss, NegGradLoss, SISSNoISLoss
from siss.losses import SISSLoss, UnlearningLoss
from siss.schedule import NoiseSchedule

_CLASSES: dict[str, type[UnlearningLoss]] = {
    "siss": SISSLoss,
    "siss-nois": SISSNoISLoss,
    "naive": NaiveDeletionLoss,
    "neggrad": NegGradLoss,
    "erasediff": EraseDiffLoss,
}

METHODS: tuple[str, ...] = tuple(_CLASSES)
"""The names ``make_loss`` accepts.

Example:
    >>> METHODS
    ('siss', 'siss-nois', 'naive', 'neggrad', 'erasediff')
"""


def make_loss(
    name: str, alphas_cumprod: Tensor | NoiseSchedule, /, **kwargs: Any
) -> UnlearningLoss:
    """Build the unlearning loss called ``name`` with the class's own keyword arguments.

    Args:
        name: one of ``METHODS``.
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        **kwargs: passed to the class (e.g. ``lam``, ``superfactor``, ``n``, ``k``,
            ``x_from``, ``prediction_type``, ``reduction``); an argument the class does not take
            raises ``TypeError``.

    Example:
        >>> import torch
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> make_loss("siss", torch.cumprod(1 - betas, 0), lam=0.0, superfactor=0.1).lam
        0.0
    """
    try:
        cls = _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown unlearning method {name!r}; choose one of {', '.join(map(repr, METHODS))}"
        ) from None
    return cls(alphas_cumprod, **kwargs)

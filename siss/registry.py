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
``retrack``    ``ReTrackLoss``           ReTrack (Shi et al., arXiv 2509.13007; not in the
                                         paper): redirect to the k nearest kept neighbours
=============  ========================  =====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import Tensor

from siss.baselines import EraseDiffLoss, NaiveDeletionLoss, NegGradLoss, SISSNoISLoss
from siss.losses import SISSLoss, UnlearningLoss
from siss.retrack import ReTrackLoss
from siss.schedule import NoiseSchedule


class MethodRules(NamedTuple):
    """What an unlearning method needs from the training step around it (``siss.recipe``).

    Attributes:
        loss: the ``UnlearningLoss`` class.
        teacher: the method has SISS's keep term, which a frozen model's prediction can replace
            (``SISSLoss.terms(..., teacher_output=)``; ``teacher_siss_terms``), at
            ``0 < λ < 1`` only: at ``λ`` 0 or 1 an unbounded importance weight enters that keep
            term, and ``UnlearningConfig`` takes the noise target there.
        subsets: the loss takes ``n = |X|`` and ``k = |A|`` (the forget term's ``k/(n-k)``).
        superfactor: the superfactor when none is given and no balancer sets it: NegGrad's and
            EraseDiff's forget term is the whole objective (``s = 1``), ReTrack weighs its
            redirect term as its keep term (``s = 1``); ``0.0`` for the others.
        balancer: the superfactor rule (``NormBalancer`` mode): ``"config"`` for the run's
            ``balance_mode``, ``"bilevel"`` for EraseDiff's own rule, ``None`` for methods with
            nothing to balance (naive deletion has no forget term, NegGrad no keep term) or
            whose terms are both descent terms on ``L_{X\\A}`` with a fixed weight (ReTrack).
        refused: prediction type -> why the method cannot train a model of that type.

    Examples:
        >>> RULES["neggrad"].superfactor, RULES["neggrad"].balancer
        (1.0, None)
    """

    loss: type[UnlearningLoss]
    teacher: bool
    subsets: bool
    superfactor: float
    balancer: str | None
    refused: Mapping[str, str] = MappingProxyType({})


RULES: Mapping[str, MethodRules] = MappingProxyType(
    {
        "siss": MethodRules(
            SISSLoss, teacher=True, subsets=True, superfactor=0.0, balancer="config"
        ),
        "siss-nois": MethodRules(
            SISSNoISLoss, teacher=False, subsets=True, superfactor=0.0, balancer="config"
        ),
        "naive": MethodRules(
            NaiveDeletionLoss, teacher=False, subsets=False, superfactor=0.0, balancer=None
        ),
        "neggrad": MethodRules(
            NegGradLoss, teacher=False, subsets=False, superfactor=1.0, balancer=None
        ),
        "erasediff": MethodRules(
            EraseDiffLoss,
            teacher=False,
            subsets=False,
            superfactor=1.0,
            balancer="bilevel",
            refused=MappingProxyType(
                {
                    "flow_prediction": "EraseDiff fits the predicted noise to uniform [0, 1) "
                    "targets; a rectified-flow model predicts the velocity eps - x_0, for which "
                    "that target is not defined",
                    "v_prediction": "EraseDiff fits the predicted noise to uniform [0, 1) "
                    "targets; a v-prediction model predicts v = alpha_t eps - sigma_t x_0, for "
                    "which that target is not defined",
                    "sample": "EraseDiff fits the predicted noise to uniform [0, 1) targets; a "
                    "sample-prediction model predicts x_0, for which that target is not defined",
                }
            ),
        ),
        # ReTrack: no teacher (its keep term is the plain l_x, with no importance weight for a
        # teacher's prediction to replace), no n/k (both of its terms estimate L_{X\A}, neither
        # carries k/(n-k)), and flow models allowed: its forget target is the posterior mean of
        # the model's own regression target, which is affine in (x_0, eps) for every prediction
        # type, rectified flow's velocity eps - x_0 included.
        "retrack": MethodRules(
            ReTrackLoss, teacher=False, subsets=False, superfactor=1.0, balancer=None
        ),
    }
)
"""Per-method rules, by the names ``make_loss`` accepts: one table, read by the recipe and the
commands (``MethodRules``).

Examples:
    >>> ", ".join(name for name, rules in RULES.items() if rules.teacher)
    'siss'
"""

METHODS: tuple[str, ...] = tuple(RULES)
"""The names ``make_loss`` accepts.

Examples:
    >>> METHODS
    ('siss', 'siss-nois', 'naive', 'neggrad', 'erasediff', 'retrack')
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

    Examples:
        >>> import torch
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> make_loss("siss", torch.cumprod(1 - betas, 0), lam=0.0, superfactor=0.1).lam
        0.0
    """
    try:
        cls = RULES[name].loss
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown unlearning method {name!r}; choose one of {', '.join(map(repr, METHODS))}"
        ) from None
    return cls(alphas_cumprod, **kwargs)

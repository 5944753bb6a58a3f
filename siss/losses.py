"""Unlearning losses: the shared protocol and the SISS loss (Eqs. 8 and 15).

Every loss is used the same way inside an ordinary training loop::

    draw = loss_fn.sample(x0, a0, generator=generator)   # noisy batch + bookkeeping
    model_output = model(draw.noisy, draw.timesteps)      # ONE forward pass
    loss = loss_fn(model_output, draw)                    # scalar
    loss.backward()

``loss_fn.terms(model_output, draw)`` returns the keep and forget terms separately, with
``loss = keep - superfactor * forget``, for gradient-norm balancing.

Per-row loss weights (e.g. the min-SNR-γ weighting of diffusers' training scripts) apply to both
terms of a row before the batch reduction: ``snr_gamma=5.0`` in the constructor, or
``loss_fn(model_output, draw, weights=w)`` with any ``w`` of shape ``(B,)``. A weight that depends
on the row's timestep only keeps Lemma 1: both terms of a row share ``t``, so the estimator is
unbiased for the weighted objective ``E_t[w(t) (L_{X\\A,t} - s k/(n-k) L_{A,t})]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from siss import _random
from siss._checks import (
    append_dims,
    broadcast_forget,
    check_choice,
    check_loss_finite,
    check_max_weight,
    check_model_output,
    check_nonnegative,
    check_pair,
    check_probability,
    check_rows,
    check_set_sizes,
    check_tensor,
    check_window,
    work_dtype,
)
from siss.sampler import mixture_sample
from siss.schedule import NoiseSchedule, TimestepSpec
from siss.targets import PREDICTION_TYPES, PredictionType, prediction_target
from siss.weights import DEFAULT_MAX_WEIGHT, importance_weights

Reduction = Literal["mean", "sum", "none"]
XFrom = Literal["retain", "all"]


class LossTerms(NamedTuple):
    """A loss and its two parts, with ``loss = keep - superfactor * forget``.

    ``keep`` estimates the naive-deletion loss ``L_{X\\A}`` (Eq. 2) and ``forget`` estimates
    ``k/(n-k) L_A`` (the NegGrad loss of Eq. 3 up to the constant of Eq. 4). Scalars for
    ``reduction="mean"``/``"sum"``, ``(B,)`` for ``"none"``.

    Examples:
        >>> alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> loss_fn = SISSLoss(alphas_cumprod, superfactor=0.1)
        >>> draw = loss_fn.sample(torch.randn(4, 8), torch.randn(1, 8))
        >>> terms = loss_fn.terms(torch.zeros(4, 8), draw)  # your model's output on draw.noisy
        >>> torch.allclose(terms.loss, terms.keep - 0.1 * terms.forget)
        True
    """

    loss: Tensor
    keep: Tensor
    forget: Tensor


@dataclass(frozen=True)
class SISSDraw:
    """One batch drawn from the defensive mixture, ready for a single model call.

    Attributes:
        noisy: model input ``m_t``, shape ``(B, ...)``, dtype of ``x0``.
        timesteps: the model's timestep input, shape ``(B,)`` (scheduler convention: integer for
            DDPM-style schedules, float for flow matching).
        indices: grid index into the schedule, shape ``(B,)``, int64.
        gamma, sigma: schedule values per row, shape ``(B,)``, float32.
        x0, a0: the clean keep and forget points, shape ``(B, ...)``.
        noise: ``eps`` with ``noisy = gamma * source + sigma * eps``, shape ``(B, ...)``.
        from_forget: which rows took their source from ``a0``, shape ``(B,)``, bool.
        weight_x, weight_a: importance weights of Eq. 8, shape ``(B,)``, float32, detached.

    Examples:
        >>> alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> loss_fn = SISSLoss(alphas_cumprod, superfactor=0.1)
        >>> draw = loss_fn.sample(torch.randn(4, 3, 8, 8), torch.randn(1, 3, 8, 8), timesteps=999)
        >>> draw.noisy.shape, draw.timesteps.tolist()
        (torch.Size([4, 3, 8, 8]), [999, 999, 999, 999])
        >>> torch.allclose(0.5 * draw.weight_x + 0.5 * draw.weight_a, torch.ones(4))  # λ = 0.5
        True
    """

    noisy: Tensor
    timesteps: Tensor
    indices: Tensor
    gamma: Tensor
    sigma: Tensor
    x0: Tensor
    a0: Tensor
    noise: Tensor
    from_forget: Tensor
    weight_x: Tensor
    weight_a: Tensor


def siss_terms(
    error_x: Tensor,
    error_a: Tensor,
    weight_x: Tensor,
    weight_a: Tensor,
    forget_ratio: float,
    x_from: XFrom,
) -> tuple[Tensor, Tensor]:
    """Per-row keep and forget terms of the SISS loss; ``loss = keep - s * forget``.

    With ``l_x``, ``l_a`` the squared errors against the targets of ``x`` and ``a`` and
    ``ρ = k/(n-k)`` (``forget_ratio``):

    * ``x_from="all"`` (Eq. 8, ``x ~ p_X``):
      ``keep = n/(n-k) w_x l_x - ρ w_a l_a`` with ``n/(n-k) = 1 + ρ``, ``forget = ρ w_a l_a``,
      so ``keep - s forget = n/(n-k) w_x l_x - (1+s) ρ w_a l_a``.
    * ``x_from="retain"`` (Eq. 15, ``x ~ p_{X\\A}``): ``keep = w_x l_x``, ``forget = ρ w_a l_a``.

    For ``0 < λ < 1`` the weights are bounded (Eqs. 9–10) and ``E[keep] = L_{X\\A}``,
    ``E[forget] = ρ L_A`` (Eq. 7, Lemma 1), with finite variance. At the extremes one weight is
    unbounded and capped (``max_weight``), and only one term stays unbiased:

    * ``λ = 0`` (every row noised from ``x``): ``w_x = 1`` exactly, so ``keep`` is unbiased;
      ``w_a = q(m|a)/q(m|x)`` is unbounded, and ``forget`` is biased low — by the cap, and in
      high dimension also because its mass sits in draws too rare to occur in a run (48
      dimensions, 25,600 rows: forget term 0.009 against 0.116).
    * ``λ = 1`` (every row noised from ``a``): ``forget`` is unbiased and ``keep`` is biased low
      the same way (keep term 0.075 against 0.497; an independent review saw 0.96 against 1.60
      with ``max_weight=1e30``). ``tests/test_losses.py::test_what_holds_at_the_lambda_extremes``.

    So ``λ ∈ {0, 1}`` are the paper's ablations ("behaves like naive deletion / NegGrad"), not
    unbiased estimators of Eq. 8.

    Args:
        error_x: squared errors ``l_x`` against the targets of ``x``, shape ``(B,)``.
        error_a: squared errors ``l_a`` against the targets of ``a``, shape ``(B,)``.
        weight_x: importance weights ``w_x``, shape ``(B,)``.
        weight_a: importance weights ``w_a``, shape ``(B,)``.
        forget_ratio: ``ρ = k/(n-k)``.
        x_from: where ``x`` is drawn from, ``"all"`` or ``"retain"``.

    Returns:
        ``(keep, forget)``, each ``(B,)``.

    Examples:
        >>> error_x, error_a = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
        >>> weight_x, weight_a = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> siss_terms(error_x, error_a, weight_x, weight_a, 0.25, "retain")  # Eq. 15
        (tensor([2., 0.]), tensor([0., 2.]))
        >>> siss_terms(error_x, error_a, weight_x, weight_a, 0.25, "all")  # Eq. 8: keep - forget
        (tensor([ 2.5000, -2.0000]), tensor([0., 2.]))
    """
    forget_ratio, x_from = _check_terms(
        {"error_x": error_x, "error_a": error_a, "weight_x": weight_x, "weight_a": weight_a},
        forget_ratio,
        x_from,
    )
    forget = forget_ratio * weight_a * error_a
    keep = weight_x * error_x
    if x_from == "all":
        keep = (1 + forget_ratio) * keep - forget
    return keep, forget


def teacher_siss_terms(
    distill: Tensor,
    error_a: Tensor,
    weight_x: Tensor,
    weight_a: Tensor,
    forget_ratio: float,
    x_from: XFrom,
) -> tuple[Tensor, Tensor]:
    """Per-row keep and forget terms of the SISS loss with a frozen teacher's keep target.

    The teacher is the model before unlearning. If its prediction ``f_pre(m)`` is the posterior
    mean of the target given ``m`` under ``X`` (what pretraining on ``X`` fits), then for any
    model ``f_θ``

        L_X(θ) = D_X(θ) + C,        D_S(θ) = E_{c ~ S, m ~ q(·|c)} ||f_θ(m) - f_pre(m)||²,

    with ``C`` free of ``θ`` (the denoising score-matching identity, Vincent 2011). Splitting
    ``X`` into ``X \\ A`` and ``A`` gives ``L_{X\\A} = D_{X\\A} + ρ (D_A - L_A) + C'``: naive
    deletion is "match the teacher everywhere, minus ``ρ`` NegGrad on ``A``". The terms below
    estimate that from the same draw, with ``d = ||f_θ(m) - f_pre(m)||²`` (one value per row, as
    it depends on ``m`` only) and ``ρ = k/(n-k)``:

    * ``x_from="all"`` (Eq. 8 with ``l_x`` replaced by ``d``):
      ``keep = n/(n-k) w_x d - ρ w_a l_a``;
    * ``x_from="retain"`` (Eq. 15): ``keep = (w_x + ρ w_a) d - ρ w_a l_a``;
    * ``forget = ρ w_a l_a`` in both, as in ``siss_terms``.

    So ``E[keep - s forget]`` has the gradient of Lemma 1's objective, but the keep term no longer
    regresses on the drawn noise of ``l_x``. That is not "no noise": at the teacher's weights
    ``d`` and its gradient are exactly 0 and the keep gradient is ``-ρ w_a ∇l_a``, whose
    covariance equals the forget term's. The keep gradient's variance does fall below the noise
    target's near the optimum (an independent float64 review: 12.6× on its toy, 3.6× with the
    exact posterior-mean teacher), but what is left is NegGrad's noise.

    The condition is stationarity, not "the exact posterior mean": at the teacher's weights
    ``θ_pre`` the expected keep gradient is ``-ρ ∇L_A``, off Lemma 1's ``∇L_{X\\A}`` by exactly
    ``-n/(n-k) ∇L_X(θ_pre)``. A teacher is unbiased there when it is stationary for ``L_X``
    under the timestep distribution and row weighting that unlearning uses (a model pretrained
    on uniform timesteps without weighting is not, for a ``timesteps`` window or ``snr_gamma``);
    elsewhere the fine-tuned model is held to the teacher rather than refitted to ``X \\ A``: a
    bias towards the model you started from (docs/math.md bounds it).

    Only for ``0 < λ < 1``: at ``λ = 0`` the unbounded ``w_a`` enters the keep term, which is
    then biased like the forget term (``siss_terms``), while the noise target's keep term
    ``l_x`` stays exact; at ``λ = 1`` the unbounded ``w_x`` does. ``SISSLoss.terms`` refuses a
    teacher at either extreme.

    Args:
        distill: ``d``, squared errors against the teacher's prediction, shape ``(B,)``.
        error_a: squared errors ``l_a`` against the targets of ``a``, shape ``(B,)``.
        weight_x: importance weights ``w_x``, shape ``(B,)``.
        weight_a: importance weights ``w_a``, shape ``(B,)``.
        forget_ratio: ``ρ = k/(n-k)``, the true one (the keep term needs it).
        x_from: ``"all"`` or ``"retain"``.

    Returns:
        ``(keep, forget)``, each ``(B,)``.

    Examples:
        >>> distill, error_a = torch.tensor([0.0, 0.5]), torch.tensor([3.0, 4.0])
        >>> weight_x, weight_a = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> teacher_siss_terms(distill, error_a, weight_x, weight_a, 0.25, "retain")
        (tensor([ 0.0000, -1.7500]), tensor([0., 2.]))
    """
    forget_ratio, x_from = _check_terms(
        {"distill": distill, "error_a": error_a, "weight_x": weight_x, "weight_a": weight_a},
        forget_ratio,
        x_from,
    )
    forget = forget_ratio * weight_a * error_a
    if x_from == "all":
        keep = (1 + forget_ratio) * weight_x * distill - forget
    else:
        keep = (weight_x + forget_ratio * weight_a) * distill - forget
    return keep, forget


def _check_terms(rows: dict[str, Tensor], forget_ratio: float, x_from: str) -> tuple[float, str]:
    """The per-row terms' inputs: ``(B,)`` tensors of one shape and device (a ``(B, 1)`` weight
    broadcast to ``(B, B)`` terms), ``ρ >= 0`` finite, ``x_from`` one of the two sampling
    schemes (any other string used Eq. 15's formula). Shapes and choices only: no host sync."""
    (first_name, first), *others = rows.items()
    check_tensor(first, first_name, dims="of shape (B,)", ndim=1, meta=True)
    for name, values in others:
        check_tensor(values, name, dims="of shape (B,)", meta=True)
        if values.shape != first.shape or values.device != first.device:
            raise ValueError(
                f"`{name}` must have the shape {tuple(first.shape)} and device {first.device} "
                f"of `{first_name}`, got {tuple(values.shape)} on {values.device}"
            )
    return check_nonnegative(forget_ratio, "forget_ratio"), check_choice(
        x_from, "x_from", ("retain", "all")
    )


def required_superfactor(superfactor: float | None, owner: str) -> float:
    """``s`` given explicitly: the shortest call must not silently be naive deletion."""
    if superfactor is None:
        raise ValueError(
            f"{owner} needs `superfactor` (s >= 0, the weight of the NegGrad term, Eq. 8): the "
            "paper tunes it so that the NegGrad gradient is ~10% of the naive-deletion gradient "
            "(try 0.1, or siss.NormBalancer); s = 0 is naive deletion in expectation; with a "
            "NormBalancer the loss's superfactor is not used (pass 0.0)"
        )
    return check_nonnegative(superfactor, "superfactor")


def check_subsets(
    n: int | None, k: int | None, x_from: str
) -> tuple[int | None, int | None, XFrom, float]:
    """``(n, k, x_from, k/(n-k))``; Eq. 8 (``x_from="all"``) needs ``n`` and ``k``."""
    n, k = check_set_sizes(n, k)
    x_from = check_choice(x_from, "x_from", ("retain", "all"))
    if x_from == "all" and n is None:
        raise ValueError(
            "x_from='all' (Eq. 8) needs `n` (|X|, the forget set included) and `k` (|A|): its "
            "keep weight n/(n-k) cannot be folded into the superfactor"
        )
    return n, k, x_from, 1.0 if n is None else k / (n - k)


class UnlearningLoss(nn.Module):
    """Protocol shared by every unlearning loss of the library.

    Subclasses implement ``sample(x0, a0, timesteps=None, generator=None)`` returning a draw with at
    least ``.noisy`` and ``.timesteps``, and ``terms(model_output, draw)`` returning ``LossTerms``.

    Args:
        alphas_cumprod: the DDPM schedule ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule`` (e.g.
            ``NoiseSchedule.from_flow_sigmas`` for flow matching).
        superfactor: ``s >= 0`` in ``loss = keep - s * forget``.
        prediction_type: what the model predicts; see ``siss.targets``.
        reduction: ``"mean"`` (default, the diffusers convention), ``"sum"`` over the batch, or
            ``"none"`` for per-row losses ``(B,)``.

    Examples:
        >>> from siss import EraseDiffLoss
        >>> alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> x0, a0 = torch.randn(4, 3, 8, 8), torch.randn(1, 3, 8, 8)
        >>> losses = SISSLoss(alphas_cumprod, superfactor=0.1), EraseDiffLoss(alphas_cumprod)
        >>> for loss_fn in losses:
        ...     draw = loss_fn.sample(x0, a0)  # one batch for ONE model call
        ...     terms = loss_fn.terms(torch.zeros_like(draw.noisy), draw)  # model(draw.noisy, ...)
        ...     print(type(loss_fn).__name__, tuple(draw.noisy.shape), terms.loss.shape)
        SISSLoss (4, 3, 8, 8) torch.Size([])
        EraseDiffLoss (8, 3, 8, 8) torch.Size([])
    """

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        *,
        superfactor: float = 0.0,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(alphas_cumprod, NoiseSchedule):
            self.schedule = alphas_cumprod
        else:
            self.schedule = NoiseSchedule.from_alphas_cumprod(alphas_cumprod)
        self.superfactor = check_nonnegative(superfactor, "superfactor")
        self.prediction_type = check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)
        self.reduction = check_choice(reduction, "reduction", ("mean", "sum", "none"))
        if snr_gamma is not None:
            check_nonnegative(snr_gamma, "snr_gamma")
            if snr_gamma == 0 or self.prediction_type == "flow_prediction":
                raise ValueError(
                    "`snr_gamma` (min-SNR-γ weighting) must be > 0 and is defined for the "
                    "variance-preserving prediction types; for flow matching pass `weights=` "
                    "(e.g. diffusers' compute_loss_weighting_for_sd3) to the loss"
                )
            snr_gamma = float(snr_gamma)
        self.snr_gamma = snr_gamma

    def forward(self, model_output: Tensor, draw: object, weights: Tensor | None = None) -> Tensor:
        """The scalar loss (``(B,)`` with ``reduction="none"``) for ``model_output`` on ``draw``.

        ``weights`` (``(B,)``, optional) multiply each row's loss before the reduction.
        """
        return self.terms(model_output, draw, weights=weights).loss

    def terms(
        self, model_output: Tensor, draw: object, weights: Tensor | None = None
    ) -> LossTerms:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"T={len(self.schedule)}, superfactor={self.superfactor}, "
            f"prediction_type={self.prediction_type!r}, reduction={self.reduction!r}, "
            f"snr_gamma={self.snr_gamma}"
        )

    def _schedule_rows(
        self, x0: Tensor, timesteps: TimestepSpec, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Grid indices, ``gamma``, ``sigma`` (float32) and model timesteps, ``(B,)`` each."""
        if self.schedule.gamma.device != x0.device:
            raise ValueError(
                f"`x0` is on {x0.device} but the loss's schedule is on "
                f"{self.schedule.gamma.device}: move the loss with `loss_fn.to(device)`"
            )
        indices = self.schedule.sample_indices(x0.shape[0], timesteps, generator=generator)
        return (
            indices,
            self.schedule.gamma[indices],
            self.schedule.sigma[indices],
            self.schedule.timesteps[indices],
        )

    def _squared_error(
        self, prediction: Tensor, clean: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor
    ) -> Tensor:
        """Per-row MSE ``(B,)`` against the target for ``clean``; mean over non-batch dims."""
        target = prediction_target(self.prediction_type, clean, noise, gamma, sigma)
        return (prediction - target).square().flatten(1).mean(1)

    def _row_weights(self, draw: object, weights: Tensor | None, keep: Tensor) -> Tensor | None:
        """Per-row weights ``(B,)``: the caller's ``weights`` times min-SNR-γ's, or ``None``."""
        if weights is not None:
            check_rows(weights, "weights", keep)
            weights = weights.to(keep.dtype)
        if self.snr_gamma is None:
            return weights
        rows = keep.shape[0]  # a 2B-row draw repeats its B timesteps: the first B are the pairs
        gamma, sigma = (v[:rows].to(keep.dtype) for v in (draw.gamma, draw.sigma))
        snr = (gamma / sigma).square()
        # diffusers' train_text_to_image.py: min(snr, γ) / snr for epsilon, / (snr + 1) for v;
        # written min(1, γ/snr) for epsilon so that a zero-SNR step (γ_t = 0) weighs 1, not 0/0.
        if self.prediction_type == "epsilon":
            snr_weights = (self.snr_gamma / snr).clamp(max=1.0)
        else:
            snr_weights = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "v_prediction":
            snr_weights = snr_weights / (snr + 1)
        return snr_weights if weights is None else snr_weights * weights

    def _combine(
        self, keep: Tensor, forget: Tensor, draw: object, weights: Tensor | None
    ) -> LossTerms:
        row_weights = self._row_weights(draw, weights, keep)
        if row_weights is not None:
            keep, forget = keep * row_weights, forget * row_weights
        loss = keep - self.superfactor * forget
        check_loss_finite(loss)
        if self.reduction == "none":
            return LossTerms(loss, keep, forget)
        reduce = torch.mean if self.reduction == "mean" else torch.sum
        return LossTerms(reduce(loss), reduce(keep), reduce(forget))


class SISSLoss(UnlearningLoss):
    """Subtracted Importance Sampled Scores (paper, Eqs. 5, 8 and 15): one forward pass per step.

    Each row pairs a keep point ``x`` with a forget point ``a``, draws ``m_t`` from the defensive
    mixture ``(1-λ) q(·|x) + λ q(·|a)`` (Eq. 6) and scores the single model output against both
    targets, importance-weighted so that the expectation of the loss and of its gradient equals the
    naive-deletion loss on ``X \\ A`` minus ``s k/(n-k)`` times the NegGrad loss on ``A``
    (Lemma 1; Eq. 12).

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)`` (e.g. ``DDPMScheduler.alphas_cumprod``), or a
            ``NoiseSchedule``.
        lam: mixture weight ``λ`` in ``[0, 1]``. ``0.5`` is the paper's choice; ``0`` behaves like
            naive deletion and ``1`` like NegGrad (§4).
        superfactor: ``s >= 0``, the extra weight on the NegGrad term (Eq. 8); required, as the
            paper gives no default: ``s = 0`` is naive deletion in expectation, and §5 tunes ``s``
            so that the NegGrad gradient is ~10% of the naive-deletion one (``NormBalancer``
            does that; with a balancer the value here is not used, pass ``0.0``).
        n: ``|X|``, the size of the whole training set, the forget set included.
        k: ``|A|``, the number of points to forget. With ``n`` and ``k`` unset (allowed for
            ``x_from="retain"`` only), ``k/(n-k)`` is taken as 1: the forget term's constant is
            then folded into ``superfactor``, which is how the paper tunes it (§5).
        x_from: ``"retain"`` (default) when the loader of ``x0`` yields ``X \\ A`` only (Eq. 15,
            ``loss = w_x l_x - s k/(n-k) w_a l_a``), ``"all"`` when it yields all of ``X``
            (Eq. 8, ``loss = n/(n-k) w_x l_x - (1+s) k/(n-k) w_a l_a``; needs ``n`` and ``k``,
            because ``n/(n-k)`` cannot be folded into ``s``).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
            ``"flow_prediction"``; each term regresses on its own clean point's target.
        max_weight: cap on the weight that is unbounded at ``λ = 0`` or ``λ = 1``
            (see ``siss.functional.importance_weights``; what then holds: ``siss_terms``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the batch.
        snr_gamma: min-SNR-γ loss weighting of each row by its timestep, as diffusers'
            ``--snr_gamma`` (``min(SNR, γ)/SNR`` for epsilon, ``/(SNR+1)`` for v-prediction);
            ``None`` (default) for none.
        forget_timesteps: an inclusive ``(low, high)`` window of grid indices outside which
            the forget (NegGrad) term is 0: the time-restricted variant (arXiv 2510.17917
            reports gains from not forgetting at every noise level). The draw and the keep term
            are unchanged, so the loss estimates ``L_{X\\A} - s k/(n-k) E[1[t in window] l_a]``
            (Lemma 1 with the indicator in the forget term). ``None`` (default): every ``t``.

    Attributes:
        forget_timestep_weights: ``None``, or a ``(T,)`` float tensor of weights of the forget
            term per grid index (the ``forget_timesteps`` window sets it to that window's
            indicator). Set it between steps with ``restrict_forget`` (which keeps the window:
            its weights are multiplied by the indicator) to change where and how strongly the
            forget term acts within it, e.g. the per-noise-level rules of
            ``siss.stopping.NonmemberStop`` (``"per_level"``: 0 or 1; ``"track"``: in [-1, 1],
            a negative weight reversing the term there, descent on ``l_a``): the loss then
            estimates ``L_{X\\A} - s k/(n-k) E[v(t) l_a]``.
        forget_level: ``None``, or a ``(T,)`` float tensor ``c``: the forget term takes
            ``l_a - l_a^2 / (2 c[t])`` instead of ``l_a`` (set with ``set_forget_level``). Its
            slope in ``l_a`` is 1 at 0 (NegGrad), 0 at ``c[t]`` and negative past it, so the
            forget term pushes a row's error up to ``c[t]`` and pulls it back beyond. With the
            non-member level as ``c`` (``siss.stopping.NonmemberStop.forget_level``) the forget
            set is driven toward where data the model never saw sits, at each noise level, and
            pulled back rather than pushed past it; the loss estimates
            ``L_{X\\A} - s k/(n-k) E[l_a - l_a^2/(2c(t))]`` (importance sampling holds for any
            function of the draw). Keep the forget coefficient fixed with it (a ``NormBalancer``
            that does not refresh): a refresh would rescale the gradient, small near the level
            by design, back to full size.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> loss_fn = SISSLoss(torch.cumprod(1 - betas, 0), lam=0.5, superfactor=0.1)
        >>> x0, a0 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
        >>> draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
        >>> model_output = torch.zeros_like(draw.noisy, requires_grad=True)  # your model here
        >>> loss_fn(model_output, draw).shape
        torch.Size([])
    """

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        lam: float = 0.5,
        superfactor: float | None = None,
        n: int | None = None,
        k: int | None = None,
        x_from: XFrom = "retain",
        *,
        prediction_type: PredictionType = "epsilon",
        max_weight: float = DEFAULT_MAX_WEIGHT,
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
        forget_timesteps: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=required_superfactor(superfactor, type(self).__name__),
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )
        self.lam = check_probability(lam, "lam")
        self.n, self.k, self.x_from, self.forget_ratio = check_subsets(n, k, x_from)
        self.max_weight = check_max_weight(max_weight)
        self.forget_timesteps = check_window(forget_timesteps, len(self.schedule))
        window = None
        if self.forget_timesteps is not None:
            low, high = self.forget_timesteps
            window = torch.zeros(len(self.schedule))
            window[low : high + 1] = 1.0
        self.register_buffer("forget_window", window, persistent=False)
        self.register_buffer("forget_timestep_weights", window, persistent=False)
        self.register_buffer("forget_level", None, persistent=False)

    def set_forget_level(self, level: Tensor | None) -> None:
        """Drive the forget term's squared error to ``level[t]`` from the next draw on: the
        forget term becomes ``ρ w_a (l_a - l_a^2 / (2 level[t]))`` (``None``: plain NegGrad).

        Args:
            level: ``(T,)`` finite positive values per grid index, in the loss's own error (the
                MSE against the ``prediction_type``'s target, as ``l_a``); copied, as float32,
                onto the loss's device.
        """
        level = self._per_timestep(level, "level")
        if level is not None and not bool((level > 0).all()):
            raise ValueError("`level` must be positive at every grid index")
        self.forget_level = level

    def restrict_forget(self, weights: Tensor | None) -> None:
        """Weigh the forget term by ``weights[t]`` within the ``forget_timesteps`` window from
        the next draw on (``None``: the window alone, or every ``t`` fully without one).

        The window stays: a rule that turns levels off (``NonmemberStop(rule="per_level")``)
        restricts the term further, never widens it past what the configuration asked for.

        Args:
            weights: ``(T,)`` finite weights per grid index (negative: the forget term
                reversed there, ``NonmemberStop(rule="track")``'s pull-back); copied, as float32,
                onto the loss's device.
        """
        weights = self._per_timestep(weights, "weights", signed=True)
        if weights is not None and self.forget_window is not None:
            weights = weights * self.forget_window
        self.forget_timestep_weights = weights if weights is not None else self.forget_window

    def _per_timestep(
        self, values: Tensor | None, name: str, *, signed: bool = False
    ) -> Tensor | None:
        """``values`` checked as ``(T,)`` finite numbers (non-negative unless ``signed``),
        float32 on the device."""
        if values is None:
            return None
        values = check_tensor(values, name, min_dim=1)
        if values.shape != (len(self.schedule),) or not bool(
            (torch.isfinite(values) & (signed | (values >= 0))).all()
        ):
            kind = "finite" if signed else "finite non-negative"
            raise ValueError(
                f"`{name}` must be {len(self.schedule)} {kind} numbers, one per grid index, got "
                f"shape {tuple(values.shape)}"
            )
        return values.detach().to(self.schedule.gamma.device, torch.float32).clone()

    def forward(
        self,
        model_output: Tensor,
        draw: object,
        weights: Tensor | None = None,
        teacher_output: Tensor | None = None,
    ) -> Tensor:
        """The scalar loss (``(B,)`` with ``reduction="none"``); arguments as ``terms``'."""
        return self.terms(model_output, draw, weights=weights, teacher_output=teacher_output).loss

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, n={self.n}, k={self.k}, x_from={self.x_from!r}, "
            f"max_weight={self.max_weight}, forget_timesteps={self.forget_timesteps}, "
            + super().extra_repr()
        )

    def sample(
        self,
        x0: Tensor,
        a0: Tensor,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
    ) -> SISSDraw:
        """Draw timesteps, mixture coins and noise for one batch.

        Args:
            x0: clean keep points, shape ``(B, ...)``: from ``X \\ A`` for ``x_from="retain"``,
                from ``X`` for ``"all"``.
            a0: clean forget points, shape of ``x0``, or ``(1, ...)`` to pair every row with the
                same point (the usual case of forgetting one image); cast to ``x0``'s dtype.
            timesteps: ``None`` (uniform over the schedule), an ``int`` (fixed), a ``(low, high)``
                window (inclusive), or an integer tensor ``(B,)`` of grid indices.
            generator: source of all randomness of the draw.
        """
        a0 = broadcast_forget(x0, a0)
        check_pair(x0, a0)
        indices, gamma, sigma, model_timesteps = self._schedule_rows(x0, timesteps, generator)
        noise = _random.randn(
            tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype
        )
        noisy, from_forget = mixture_sample(x0, a0, gamma, sigma, self.lam, generator, noise=noise)
        weight_x, weight_a = importance_weights(
            noisy, x0, a0, gamma, sigma, self.lam, max_weight=self.max_weight
        )
        return SISSDraw(
            noisy=noisy,
            timesteps=model_timesteps,
            indices=indices,
            gamma=gamma,
            sigma=sigma,
            x0=x0,
            a0=a0,
            noise=noise,
            from_forget=from_forget,
            weight_x=weight_x,
            weight_a=weight_a,
        )

    def terms(
        self,
        model_output: Tensor,
        draw: SISSDraw,
        weights: Tensor | None = None,
        teacher_output: Tensor | None = None,
    ) -> LossTerms:
        """Keep and forget terms (``LossTerms``) of Eq. 8 / Eq. 15 for one model output.

        Args:
            model_output: the model's prediction on ``draw.noisy``, shape of ``draw.noisy``; any
                float dtype (fp16/bf16 under autocast), reduced in float32.
            draw: the result of ``sample``.
            weights: optional per-row loss weights, shape ``(B,)`` (times min-SNR-γ's, if set).
            teacher_output: optional prediction of the frozen model before unlearning on
                ``draw.noisy`` (shape of ``model_output``; computed without gradient, e.g. under
                ``torch.no_grad()``). The keep term then matches it instead of the drawn noise:
                Lemma 1's gradient in expectation where the teacher is stationary for the loss,
                without ``l_x``'s regression on the noise (``teacher_siss_terms``). Needs ``n``
                and ``k``, and ``0 < lam < 1``: at ``lam`` 0 or 1 the unbounded importance
                weight enters the keep term and biases it, so a teacher there is refused
                (``ValueError``); use the noise keep target (``teacher_output=None``).
        """
        if not isinstance(draw, SISSDraw):
            raise TypeError(f"`draw` must come from SISSLoss.sample, got {type(draw).__name__}")
        check_model_output(model_output, draw.noisy.shape, draw.noisy.device)
        if teacher_output is not None:
            if self.lam in (0.0, 1.0):
                weight = "w_a = q(m|a)/q(m|x)" if self.lam == 0.0 else "w_x = q(m|x)/q(m|a)"
                raise ValueError(
                    f"`teacher_output` at lam={self.lam:g}: the teacher keep term carries the "
                    f"unbounded importance weight {weight}, which biases it; use the noise keep "
                    "target (teacher_output=None; exact at lam=0, where w_x = 1), or "
                    "0 < lam < 1 (siss.functional.teacher_siss_terms)"
                )
            if self.n is None:
                raise ValueError(
                    "`teacher_output` needs the loss's `n` and `k`: its keep term weighs the "
                    "forget rows by the true k/(n-k)"
                )
            check_model_output(
                teacher_output, draw.noisy.shape, draw.noisy.device, "teacher_output"
            )
        dtype = work_dtype(draw.x0, model_output)
        prediction = model_output.to(dtype)
        x0, a0, noise = (t.to(dtype) for t in (draw.x0, draw.a0, draw.noise))
        # The noise each clean point implies, (m - gamma c) / sigma, written so that the source's
        # own term is exactly `noise` and the other adds gamma/sigma times the gap: no cancellation.
        shift = append_dims(draw.gamma.to(dtype) / draw.sigma.to(dtype), x0.ndim) * (a0 - x0)
        forget_rows = append_dims(draw.from_forget.to(dtype), x0.ndim)
        noise_a = torch.addcmul(noise, 1 - forget_rows, shift, value=-1)
        error_a = self._squared_error(prediction, a0, noise_a, draw.gamma, draw.sigma)
        weight_x, weight_a = draw.weight_x.to(dtype), draw.weight_a.to(dtype)
        if teacher_output is None:
            noise_x = torch.addcmul(noise, forget_rows, shift)
            error_x = self._squared_error(prediction, x0, noise_x, draw.gamma, draw.sigma)
            keep, forget = siss_terms(
                error_x, error_a, weight_x, weight_a, self.forget_ratio, self.x_from
            )
        else:
            distill = (prediction - teacher_output.detach().to(dtype)).square().flatten(1).mean(1)
            keep, forget = teacher_siss_terms(
                distill, error_a, weight_x, weight_a, self.forget_ratio, self.x_from
            )
        if self.forget_level is not None:  # up to the level, back down past it
            level = self.forget_level[draw.indices].to(dtype)
            forget = self.forget_ratio * weight_a * (error_a - error_a.square() / (2 * level))
        if self.forget_timestep_weights is not None:  # the time-restricted NegGrad term
            forget = forget * self.forget_timestep_weights[draw.indices].to(forget.dtype)
        return self._combine(keep, forget, draw, weights)

"""The paper's baselines and ablation as unlearning losses (section 3, Eqs. 2–4, and section 5).

Each follows the protocol of ``siss.losses.UnlearningLoss``: the schedule first, ``sample`` draws
one batch for ONE model call, ``terms`` returns ``LossTerms`` with ``loss = keep - s * forget``::

    draw = loss_fn.sample(x0, a0, generator=generator)
    model_output = model(draw.noisy, draw.timesteps)   # one call, on draw.noisy's R rows
    loss = loss_fn(model_output, draw)

=====================  ======  ===========================  ==================================
loss                   rows R  keep (estimates)             forget
=====================  ======  ===========================  ==================================
``NaiveDeletionLoss``  B       ``l_x`` (Eq. 2)              connected zero
``NegGradLoss``        B       connected zero               ``l_a`` (Eq. 3): ``loss = -s l_a``
``SISSNoISLoss``       2B      keep term of Eq. 15 / Eq. 4  ``k/(n-k) l_a``
``EraseDiffLoss``      2B      ``l_x`` (Eq. 2)              ``-mean((u - pred(a_t))²)``
=====================  ======  ===========================  ==================================

Row order of a 2B-row draw (``draw.blocks == 2``): rows ``0..B-1`` are the keep rows (noised
``x0``), rows ``B..2B-1`` the forget rows (noised ``a0``), i.e. ``noisy = torch.cat([x_t, a_t])``;
keep row ``i`` and forget row ``B + i`` share one timestep and one ``eps``. Per-row conditioning
(class labels, text embeddings) is therefore passed as ``torch.cat([cond_x, cond_a])`` — that is
``torch.cat([cond, cond])`` when both halves share it, which is what ``siss.adapters`` does.

Per-row squared errors are means over the non-batch dimensions (the diffusers convention), as in
``SISSLoss``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from siss import _random
from siss._checks import (
    broadcast_forget,
    check_batch,
    check_model_output,
    check_pair,
    work_dtype,
)
from siss.losses import (
    LossTerms,
    Reduction,
    UnlearningLoss,
    XFrom,
    check_subsets,
    required_superfactor,
    siss_terms,
)
from siss.schedule import NoiseSchedule, TimestepSpec
from siss.targets import PredictionType


@dataclass(frozen=True)
class DenoisingDraw:
    """One noised batch for the baselines, ready for a single model call on ``R`` rows.

    Attributes:
        noisy: model input, shape ``(R, ...)``, dtype of ``x0``; ``R = blocks * B``.
        timesteps: the model's timestep input, shape ``(R,)``.
        indices: grid index into the schedule, shape ``(R,)``, int64.
        gamma, sigma: schedule values per row, shape ``(R,)``, float32.
        clean: the clean point each row was noised from, shape ``(R, ...)``.
        noise: ``eps`` with ``noisy = gamma * clean + sigma * eps``, shape ``(R, ...)``.
        num_keep: how many leading rows are keep rows (from ``x0``); the rest are forget rows
            (from ``a0``). A Python int, so slicing needs no host sync.
        blocks: how many ``B``-row blocks are stacked (1 or 2): repeat per-row conditioning of the
            ``B`` pairs this many times along the batch dimension.
        uniform_target: EraseDiff's forget targets ``u ~ U[0, 1)`` for the forget rows, shape
            ``(R - num_keep, ...)``; ``None`` for the other losses.
        method: name of the loss that drew it (checked by ``terms``).

    Examples:
        >>> alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
        >>> loss_fn = SISSNoISLoss(alphas_cumprod, superfactor=0.1)
        >>> draw = loss_fn.sample(torch.randn(3, 2, 4, 4), torch.randn(1, 2, 4, 4))
        >>> draw.blocks, draw.num_keep, draw.noisy.shape  # torch.cat([x_t, a_t])
        (2, 3, torch.Size([6, 2, 4, 4]))
        >>> draw.from_forget.tolist()
        [False, False, False, True, True, True]
    """

    noisy: Tensor
    timesteps: Tensor
    indices: Tensor
    gamma: Tensor
    sigma: Tensor
    clean: Tensor
    noise: Tensor
    num_keep: int
    blocks: int
    uniform_target: Tensor | None
    method: str

    @property
    def from_forget(self) -> Tensor:
        """Which rows were noised from ``a0``, shape ``(R,)``, bool."""
        rows = torch.zeros(self.noisy.shape[0], dtype=torch.bool, device=self.noisy.device)
        rows[self.num_keep :] = True
        return rows


class _BaselineLoss(UnlearningLoss):
    """Shared sampling and bookkeeping of the baselines; subclasses set ``method``, ``terms``."""

    method = "baseline"

    def _draw(
        self,
        keep: Tensor | None,
        forget: Tensor | None,
        timesteps: TimestepSpec,
        generator: torch.Generator | None,
        *,
        uniform: bool = False,
    ) -> DenoisingDraw:
        """Noise ``keep`` then ``forget`` (``(B, ...)`` or ``None``); pair ``i`` shares t and eps.

        Randomness is drawn in a fixed order from ``generator``: grid indices ``(B,)``, noise
        ``(B, ...)``, then (EraseDiff) the uniform targets ``(B, ...)``.
        """
        parts = [part for part in (keep, forget) if part is not None]
        first = parts[0]
        indices, gamma, sigma, model_timesteps = self._schedule_rows(first, timesteps, generator)
        noise = _random.randn(
            tuple(first.shape), generator=generator, device=first.device, dtype=first.dtype
        )
        target = None
        if uniform:
            target = _random.rand(tuple(first.shape), generator=generator, device=first.device)
            target = target.to(first.dtype)
        blocks = len(parts)
        clean = torch.cat(parts) if blocks > 1 else first
        indices, gamma, sigma, model_timesteps = (
            v.repeat(blocks) for v in (indices, gamma, sigma, model_timesteps)
        )
        noise = torch.cat([noise] * blocks) if blocks > 1 else noise
        dtype = work_dtype(clean)
        view = (-1,) + (1,) * (clean.ndim - 1)
        scaled = gamma.to(dtype).view(view) * clean.to(dtype)
        noisy = torch.addcmul(scaled, sigma.to(dtype).view(view), noise.to(dtype)).to(clean.dtype)
        return DenoisingDraw(
            noisy=noisy,
            timesteps=model_timesteps,
            indices=indices,
            gamma=gamma,
            sigma=sigma,
            clean=clean,
            noise=noise,
            num_keep=0 if keep is None else keep.shape[0],
            blocks=blocks,
            uniform_target=target,
            method=self.method,
        )

    def _prediction(self, model_output: Tensor, draw: object) -> tuple[DenoisingDraw, Tensor]:
        if not isinstance(draw, DenoisingDraw) or draw.method != self.method:
            raise TypeError(
                f"`draw` must come from {type(self).__name__}.sample, got "
                f"{getattr(draw, 'method', type(draw).__name__)!r}"
            )
        check_model_output(model_output, draw.noisy.shape, draw.noisy.device)
        return draw, model_output.to(work_dtype(draw.clean, model_output))

    def _errors(self, prediction: Tensor, draw: DenoisingDraw, rows: slice) -> Tensor:
        """Per-row squared error ``(rows,)`` against each row's own target (Eq. 2 / Eq. 3)."""
        dtype = prediction.dtype
        return self._squared_error(
            prediction[rows],
            draw.clean[rows].to(dtype),
            draw.noise[rows].to(dtype),
            draw.gamma[rows],
            draw.sigma[rows],
        )


def _connected_zero(like: Tensor) -> Tensor:
    """Zeros of the shape of ``like`` that stay in its graph (backward gives zero gradients)."""
    return like * 0


class NaiveDeletionLoss(_BaselineLoss):
    """Naive deletion: fine-tune on the kept data only, ``L_{X\\A}`` (paper, Eq. 2).

    The draw holds ``B`` rows, all noised from ``x0`` (``a0`` is not used). ``keep = l_x``; the
    forget term is a zero that stays connected to the graph, so ``superfactor`` has no effect.

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        superfactor: accepted for a uniform interface; multiplies a zero term.
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"flow_prediction"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
        snr_gamma: min-SNR-γ row weighting, as in ``SISSLoss``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> loss_fn = NaiveDeletionLoss(torch.cumprod(1 - betas, 0))
        >>> x0 = torch.randn(4, 3, 8, 8)
        >>> draw = loss_fn.sample(x0, None, generator=torch.Generator().manual_seed(0))
        >>> draw.noisy.shape, loss_fn(torch.zeros_like(draw.noisy), draw).shape
        (torch.Size([4, 3, 8, 8]), torch.Size([]))
    """

    method = "naive"

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        superfactor: float = 0.0,
        *,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=superfactor,
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )

    def sample(
        self,
        x0: Tensor,
        a0: Tensor | None = None,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
    ) -> DenoisingDraw:
        """Noise ``x0`` ``(B, ...)`` (from ``X \\ A``); ``a0``, if given, is only validated."""
        if a0 is not None:
            check_pair(x0, broadcast_forget(x0, a0))
        else:
            check_batch(x0, "x0")
        return self._draw(x0, None, timesteps, generator)

    def terms(
        self, model_output: Tensor, draw: DenoisingDraw, weights: Tensor | None = None
    ) -> LossTerms:
        """``keep = l_x`` (Eq. 2), ``forget = 0`` (connected); model output ``(B, ...)``."""
        draw, prediction = self._prediction(model_output, draw)
        keep = self._errors(prediction, draw, slice(None))
        return self._combine(keep, _connected_zero(keep), draw, weights)


class NegGradLoss(_BaselineLoss):
    """NegGrad: gradient ascent on the forget set, ``loss = -s L_A`` (paper, Eq. 3).

    The draw holds ``B`` rows, all noised from ``a0``. ``keep`` is a connected zero and
    ``forget = l_a``, so ``loss = -superfactor * l_a``.

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        superfactor: ``s >= 0``, the ascent step's scale (default 1: plain NegGrad).
        prediction_type: see ``siss.targets``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``).
        snr_gamma: min-SNR-γ row weighting, as in ``SISSLoss``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> loss_fn = NegGradLoss(torch.cumprod(1 - betas, 0))
        >>> a0 = torch.randn(4, 3, 8, 8)
        >>> draw = loss_fn.sample(None, a0, generator=torch.Generator().manual_seed(0))
        >>> bool(loss_fn(torch.zeros_like(draw.noisy), draw) < 0)
        True
    """

    method = "neggrad"

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        superfactor: float = 1.0,
        *,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=superfactor,
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )

    def sample(
        self,
        x0: Tensor | None,
        a0: Tensor,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
    ) -> DenoisingDraw:
        """Noise ``B`` forget points: ``a0`` ``(B, ...)``, or ``(1, ...)`` repeated to ``x0``'s B.

        ``x0`` only sets the batch size (and is validated); pass ``None`` to use ``a0``'s.
        """
        if x0 is not None:
            a0 = broadcast_forget(x0, a0)
            check_pair(x0, a0)
        else:
            check_batch(a0, "a0")
        return self._draw(None, a0, timesteps, generator)

    def terms(
        self, model_output: Tensor, draw: DenoisingDraw, weights: Tensor | None = None
    ) -> LossTerms:
        """``keep = 0`` (connected), ``forget = l_a`` (Eq. 3); model output ``(B, ...)``."""
        draw, prediction = self._prediction(model_output, draw)
        forget = self._errors(prediction, draw, slice(None))
        return self._combine(_connected_zero(forget), forget, draw, weights)


class _PairedLoss(_BaselineLoss):
    """Losses whose draw stacks ``B`` keep rows and ``B`` forget rows: ``2B`` rows, one call."""

    def sample(
        self,
        x0: Tensor,
        a0: Tensor,
        timesteps: TimestepSpec = None,
        generator: torch.Generator | None = None,
    ) -> DenoisingDraw:
        """Noise ``x0`` and ``a0`` (each ``(B, ...)``; ``a0`` may be ``(1, ...)``) into ``2B`` rows.

        ``draw.noisy = torch.cat([x_t, a_t])``: keep rows first, then forget rows; pair ``i``
        shares its timestep and ``eps``.
        """
        a0 = broadcast_forget(x0, a0)
        check_pair(x0, a0)
        return self._draw(x0, a0, timesteps, generator, uniform=self.method == "erasediff")


class SISSNoISLoss(_PairedLoss):
    """SISS (No IS): Eq. 4 / Eq. 15's two terms without importance sampling (paper, §5).

    Two forward passes' worth of rows — one on the noisy keep batch, one on the noisy forget batch —
    made as ONE model call on ``2B`` rows (see the module docstring for the row order). The keep
    and forget terms and constants are those of ``SISSLoss`` with both importance weights equal to
    one (``siss_terms``), with ``ρ = k/(n-k)``:

    * ``x_from="retain"`` (Eq. 14, the two terms of Eq. 15; ``x0`` from ``X \\ A``):
      ``loss = l_x - s ρ l_a``.
    * ``x_from="all"`` (Eq. 4 with the ``(1+s)`` of Eq. 8; ``x0`` from ``X``):
      ``loss = n/(n-k) l_x - (1+s) ρ l_a``.

    Both are unbiased for ``L_{X\\A} - s ρ L_A``, as ``SISSLoss`` is, at twice its cost per row.

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        superfactor: ``s >= 0``, required (see ``SISSLoss``).
        n: ``|X|``, the forget set included; with ``n`` and ``k`` unset (``x_from="retain"``
            only), ``k/(n-k)`` is taken as 1.
        k: ``|A|``, the number of points to forget.
        x_from: ``"retain"`` (default) or ``"all"``, as for ``SISSLoss``.
        prediction_type: see ``siss.targets``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``, one value per pair).
        snr_gamma: min-SNR-γ row weighting, as in ``SISSLoss``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> loss_fn = SISSNoISLoss(torch.cumprod(1 - betas, 0), superfactor=0.1)
        >>> x0, a0 = torch.randn(4, 3, 8, 8), torch.randn(1, 3, 8, 8)
        >>> draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
        >>> draw.noisy.shape  # torch.cat([x_t, a_t])
        torch.Size([8, 3, 8, 8])
    """

    method = "siss-nois"

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        superfactor: float | None = None,
        n: int | None = None,
        k: int | None = None,
        x_from: XFrom = "retain",
        *,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=required_superfactor(superfactor, type(self).__name__),
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )
        self.n, self.k, self.x_from, self.forget_ratio = check_subsets(n, k, x_from)

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}, x_from={self.x_from!r}, " + super().extra_repr()

    def terms(
        self, model_output: Tensor, draw: DenoisingDraw, weights: Tensor | None = None
    ) -> LossTerms:
        """Keep and forget terms of Eq. 15 / Eq. 4; model output ``(2B, ...)``, terms per pair."""
        draw, prediction = self._prediction(model_output, draw)
        error_x = self._errors(prediction, draw, slice(None, draw.num_keep))
        error_a = self._errors(prediction, draw, slice(draw.num_keep, None))
        ones = torch.ones_like(error_x)
        keep, forget = siss_terms(error_x, error_a, ones, ones, self.forget_ratio, self.x_from)
        return self._combine(keep, forget, draw, weights)


class EraseDiffLoss(_PairedLoss):
    """EraseDiff as the SISS paper ran it: ``L_{X\\A} + s E||u - eps_θ(a_t, t)||²``, ``u ~ U[0,1)``.

    (Paper, §3; Wu et al., 2024.) The draw holds ``2B`` rows (keep rows, then forget rows; see the
    module docstring); each forget row gets its own uniform ``[0, 1)`` target, drawn from the
    ``generator`` like the rest of the draw, which the prediction is fit to (minimised), as
    ``torch.rand_like`` was in the authors' code.

    Mapping onto ``loss = keep - s * forget``: ``keep = l_x`` and ``forget = -l_u`` with
    ``l_u = mean((u - eps_θ(a_t))²)``, so ``loss = l_x + s l_u``; ``superfactor`` is EraseDiff's
    ``λ``. As NegGrad's ``forget = l_a``, the forget term is what the update should *increase*
    (here ``-l_u``: fit the noise), so ``g_keep - c g_forget = g_keep + c ∇l_u`` and
    ``siss.balancer.NormBalancer`` applies unchanged; its ``"bilevel"`` mode is EraseDiff's rule
    ``g_x + max(η - <g_x, g_u>/||g_u||², 0) g_u`` with ``g_u = ∇l_u = -g_forget``.

    Args:
        alphas_cumprod: ``ᾱ_t``, shape ``(T,)``, or a ``NoiseSchedule``.
        superfactor: EraseDiff's ``λ >= 0`` (default 1).
        prediction_type: only ``"epsilon"``: the uniform targets are targets for predicted noise.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``(B,)``, one value per pair).
        snr_gamma: min-SNR-γ row weighting, as in ``SISSLoss``.

    Examples:
        >>> betas = torch.linspace(1e-4, 0.02, 1000)
        >>> loss_fn = EraseDiffLoss(torch.cumprod(1 - betas, 0))
        >>> x0, a0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
        >>> draw = loss_fn.sample(x0, a0, generator=torch.Generator().manual_seed(0))
        >>> draw.noisy.shape, draw.uniform_target.shape
        (torch.Size([8, 3, 8, 8]), torch.Size([4, 3, 8, 8]))
    """

    method = "erasediff"

    def __init__(
        self,
        alphas_cumprod: Tensor | NoiseSchedule,
        superfactor: float = 1.0,
        *,
        prediction_type: PredictionType = "epsilon",
        reduction: Reduction = "mean",
        snr_gamma: float | None = None,
    ) -> None:
        super().__init__(
            alphas_cumprod,
            superfactor=superfactor,
            prediction_type=prediction_type,
            reduction=reduction,
            snr_gamma=snr_gamma,
        )
        if self.prediction_type != "epsilon":
            raise ValueError(
                "EraseDiffLoss fits predicted noise to uniform targets: `prediction_type` must "
                f"be 'epsilon', got {prediction_type!r}"
            )

    def terms(
        self, model_output: Tensor, draw: DenoisingDraw, weights: Tensor | None = None
    ) -> LossTerms:
        """``keep = l_x``, ``forget = -l_u``; model output ``(2B, ...)``, terms per pair."""
        draw, prediction = self._prediction(model_output, draw)
        keep = self._errors(prediction, draw, slice(None, draw.num_keep))
        target = draw.uniform_target.to(prediction.dtype)
        fit = (prediction[draw.num_keep :] - target).square().flatten(1).mean(1)
        return self._combine(keep, -fit, draw, weights)

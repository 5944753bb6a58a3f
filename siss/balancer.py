"""The superfactor rule done efficiently: balance the forget gradient against the keep gradient.

The paper (§5) sets the superfactor so that "the gradient norm of the NegGrad term is ~10% of the
naive-deletion term's". With ``LossTerms`` (``loss = keep - s * forget``) and
``g_keep = ∇keep``, ``g_forget = ∇forget``, ``NormBalancer`` writes into ``.grad``

    g = g_keep - c * g_forget

with ``c`` chosen per step by ``mode``:

==============  ==============================================================
mode            ``c``
==============  ==============================================================
``"fix"``       ``ratio ||g_keep|| / (||g_forget|| + eps)``: ``||c g_forget|| = ratio ||g_keep||``
``"clip"``      ``min(superfactor, ratio ||g_keep|| / (||g_forget|| + eps))``: at most that
``"absolute"``  ``target_norm / (||g_forget|| + eps)``: ``||c g_forget|| = target_norm``
``"bilevel"``   ``max(eta + <g_keep, g_forget> / (||g_forget||² + eps), 0)``: EraseDiff's rule
==============  ==============================================================

(``"absolute"`` is what the authors' code did, with the norm hand-tuned per data set: 500 on
CelebA-HQ, 5 on MNIST, 750 on Stable Diffusion, for a loss *summed* over the ``D`` values of an
image. This library averages over them, so their numbers become ``target_norm = 5 / 784`` on
1x28x28 MNIST, ``500 / 196_608`` on 3x256x256 CelebA-HQ and ``750 / 16_384`` on 4x64x64 SD latents.
``"bilevel"`` is EraseDiff's ``g_x + max(η - <g_x, g_a>/||g_a||², 0) g_a``
with ``g_a = -g_forget``, the gradient of the objective the forget term minimises: the step then
moves the forget objective by at least ``η ||g_forget||²``.)

Usage, with any ``siss`` loss and any number of gradient-accumulation micro-batches::

    balancer = NormBalancer(model.parameters(), ratio=0.1)
    for micro_batch in micro_batches:          # under DDP: no_sync() on all but the last
        draw = loss_fn.sample(x0, a0)
        terms = loss_fn.terms(model(draw.noisy, draw.timesteps), draw)
        balancer.backward(terms.keep, terms.forget)
    stats = balancer.step()                    # .grad <- g_keep - c g_forget
    optimizer.step()
    optimizer.zero_grad()

Cost: one forward and two backward passes per micro-batch (``keep`` with ``retain_graph``, then
``forget`` on the retained graph), and ONE extra gradient-sized buffer, the accumulated
``g_forget``: it is gathered by pointing each ``.grad`` at it during the second backward (autograd
accumulates in place), so nothing is cloned. Norms, the dot product and the combination are
``torch._foreach_*`` kernels. With ``every=K > 1`` the coefficient is refreshed that way once every
K optimizer steps and held in between, where a step is a single backward of ``keep - c * forget``.

Without a balancer, a fixed superfactor is the loss's own: ``loss_fn(output, draw).backward()``.

A forget gradient too small to measure (``||g_forget|| <= floor * ||g_keep||``, or ``<= eps``
without a keep gradient, or in ``"absolute"`` mode ``<= forget_floor``) counts as zero. It is
common: with SISS at low ``t`` the rows drawn from ``x`` have ``w_a ≈ 0``, so a batch with no
forget row has a forget gradient of exact zero, of rounding noise or of 1e-6 of its usual size,
and ``ratio ||g_keep|| / ||g_forget||`` would rescale that to 10% of the keep gradient. On
such a refresh, in every mode, ``c = 0`` is used (the step is the keep gradient, as the forget
term contributes nothing measurable), ``BalanceStats.measured`` is ``False``, the
coefficient held for amortized steps stays the last *measured* one, and the next step refreshes
again: a coefficient is never held from a step that could not measure it.

``"fix"`` and ``"clip"`` measure the forget gradient against the keep gradient, so they need a loss
with a keep term (``SISSLoss``, ``SISSNoISLoss``, ``EraseDiffLoss``); ``NegGradLoss`` has none
(``g_keep = 0`` gives ``c = 0``): use ``"absolute"`` there.

Non-finite norms: ``step`` then sets every ``.grad`` to ``None`` (PyTorch optimizers skip such
parameters, so weights and optimizer state stay put) and returns ``skipped=True``. With an fp16
``torch.amp.GradScaler`` that usually means the scaled loss overflowed; the scaler has seen no
gradients, so skip ``scaler.step`` and lower the scale yourself::

    if stats.skipped:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    else:
        scaler.step(optimizer)
        scaler.update()

Distributed (``DistributedDataParallel``, ``accelerate``): the ``keep`` backward is the ordinary
one, so DDP all-reduces it (on the micro-batch outside ``no_sync``). The ``forget`` backward runs
after DDP has finished its reduction for this backward, so DDP ignores it; ``step`` all-reduces
(averages, like DDP) the forget buffer itself with ``torch.distributed``. Norms and ``c`` are
therefore those of the globally reduced, fully accumulated gradients and agree on every rank.
Pass ``backward=accelerator.backward`` (or a ``GradScaler``-scaling callable) so both backward
passes get the same loss scaling; ``c`` is invariant to a common scale except in ``"absolute"``
mode and for ``eps``.

Sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``, also through accelerate's
``fsdp_version=2``): the parameters and their ``.grad`` are ``DTensor`` shards, detected at
construction (build the balancer after sharding). FSDP reduce-scatters *every* backward, the
forget one included (it re-gathers the parameters for it), so the forget buffer is already the
reduced shard and is not all-reduced again. The norms are computed from the local shards: each
rank's squared partial sums of ``g_keep`` and ``g_forget`` (and ``<g_keep, g_forget>`` in
``"bilevel"`` mode) are stacked in one tensor and all-reduced once over the shard group; no full
gradient is gathered and the combination is written shard by shard. One collective per refresh,
and one per amortized step (the finiteness check must agree on every rank, and no rank holds the
whole gradient). The forget backward runs without ``inputs=`` there (FSDP's sharded parameters
are not leaves of the graph; its unsharded ones are): every parameter that gets a gradient must be
in ``params``. Gradient accumulation must keep FSDP's gradient sync on (no
``set_requires_gradient_sync(False)``), since unsynced FSDP accumulates both backward passes in
one unsharded buffer. FSDP1 (``FullyShardedDataParallel``) is not supported: it frees the
unsharded parameters after the keep backward and the forget backward on the retained graph fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from siss._checks import check_choice, check_nonnegative

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor (or without distributed)
    DTensor = None

Mode = Literal["fix", "clip", "absolute", "bilevel"]
MODES: tuple[str, ...] = ("fix", "clip", "absolute", "bilevel")


class BalanceStats(NamedTuple):
    """What ``NormBalancer.step`` did, for logging. Tensors are 0-dim, detached, float32 (float64
    for a float64 model).

    Attributes:
        coefficient: ``c`` used this step (the held one on amortized steps).
        keep_norm: ``||g_keep||`` of the accumulated, reduced gradient; ``None`` on amortized
            steps (only the combined gradient exists there).
        forget_norm: ``||g_forget||`` likewise.
        skipped: a non-finite norm was found; every ``.grad`` was set to ``None`` so that
            ``optimizer.step()`` leaves the parameters (and optimizer state) untouched.
        refreshed: ``c`` was recomputed this step (two backward passes per micro-batch).
        measured: the refresh measured a forget gradient above the floor, so ``c`` was computed
            by the mode's rule and is held for the amortized steps that follow. ``False`` on
            amortized steps and on refreshes whose forget gradient counted as zero (``c = 0``
            was used, and the next step refreshes again).

    Examples:
        >>> model = torch.nn.Linear(2, 1)
        >>> balancer = NormBalancer(model.parameters(), ratio=0.1, every=2)
        >>> for step in range(2):
        ...     out = model(torch.randn(4, 2))
        ...     balancer.backward(out.square().mean(), out.mean())
        ...     stats = balancer.step()
        ...     print(stats.refreshed, stats.measured, stats.skipped, stats.keep_norm is None)
        True True False False
        False False False True
    """

    coefficient: Tensor
    keep_norm: Tensor | None
    forget_norm: Tensor | None
    skipped: bool
    refreshed: bool
    measured: bool = False


def _norms(tensors: list[Tensor]) -> list[Tensor]:
    """Per-tensor 2-norms, accumulated and returned in float32 (float64 for float64 tensors)."""
    if tensors[0].dtype == torch.float64:
        return list(torch._foreach_norm(tensors, 2.0))
    try:
        return list(torch._foreach_norm(tensors, 2.0, dtype=torch.float32))
    except (TypeError, RuntimeError):  # older torch without `dtype`, or mixed float64 tensors
        return [n.float() for n in torch._foreach_norm(tensors, 2.0)]


def _stack(values: list[Tensor]) -> Tensor:
    try:
        return torch.stack(values)
    except RuntimeError:  # parameters on several devices (model parallel)
        return torch.stack([v.to(values[0].device) for v in values])


def _is_sharded(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _shard_group(tensor: Tensor) -> dist.ProcessGroup:
    """The process group a ``DTensor`` is sharded over: its one ``Shard`` mesh dimension (FSDP2;
    HSDP's other dimension is ``Replicate``, whose ranks already hold equal shards)."""
    placements = tensor.placements  # type: ignore[attr-defined]
    dims = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(dims) != 1 or not all(p.is_shard() or p.is_replicate() for p in placements):
        raise NotImplementedError(
            f"NormBalancer handles gradients sharded along one mesh dimension (FSDP2, HSDP), "
            f"not placements {placements}"
        )
    return tensor.device_mesh.get_group(dims[0])  # type: ignore[attr-defined]


def _local(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards of ``DTensor``s (views: in-place ops on them write the shards)."""
    return [t.to_local() for t in tensors]


def _squared_sum(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``sum_i ||t_i||²``, float32 (float64 for float64 tensors), 0-dim."""
    if not tensors:
        return torch.zeros((), device=device)
    return _stack(_norms(tensors)).square().sum()


def _all_reduce_sums(sums: list[Tensor], group: dist.ProcessGroup) -> Tensor:
    """Sum the per-rank partial sums ``sums`` over ``group`` in ONE collective; returns them
    stacked (float64 if any is, else float32)."""
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    stacked = torch.stack([s.to(dtype) for s in sums])
    dist.all_reduce(stacked, group=group)
    return stacked


def _global_norm(tensors: list[Tensor], device: torch.device) -> Tensor:
    """``sqrt(sum_i ||t_i||²)`` over a list, float32, 0-dim.

    For ``DTensor`` shards (FSDP2): over the whole sharded tensors, from the local shards' squared
    sums all-reduced in one collective (a collective: every rank must call it)."""
    if tensors and _is_sharded(tensors[0]):
        total = _squared_sum(_local(tensors), device)
        return _all_reduce_sums([total], _shard_group(tensors[0]))[0].sqrt()
    if not tensors:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(_stack(_norms(tensors)))


def median_gradient_norm(params: Iterable[Tensor], losses: Iterable[Tensor]) -> float:
    """The median over ``losses`` of ``||∇_params loss||`` (the lower middle one of an even count):
    the scale of a gradient, measured once.

    For ``NormBalancer(mode="absolute", target_norm=ratio * scale)`` with ``scale`` the
    naive-deletion (keep) term's gradient norm at the starting weights: the paper's rule (§5,
    the forget gradient at ~10% of the naive-deletion one) where the keep term has no noisy
    gradient to measure it against, as with a teacher keep target (``teacher_siss_terms``),
    whose keep gradient starts at about 0. The median, because those norms are heavy-tailed
    from batch to batch (0.04 to 0.29 over 8 batches of the digits demo).

    Args:
        params: the parameters the balancer will see (those with ``requires_grad``).
        losses: scalar losses, each with a graph to ``params``; consumed one at a time (pass a
            generator so that each graph is freed before the next is built). ``.grad`` is not
            touched.

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> losses = (model(torch.randn(8, 3)).square().mean() for _ in range(5))
        >>> scale = median_gradient_norm(model.parameters(), losses)
        >>> scale > 0
        True
    """
    params = _check_params(params)
    norms = []
    for index, loss in enumerate(losses):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"`losses` must yield scalar tensors; item {index} is not one")
        grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
        present = [g for g in grads if g is not None]
        norms.append(_global_norm(present, params[0].device).detach().cpu())
    if not norms:
        raise ValueError("`losses` must yield at least one loss")
    scale = torch.stack(norms).median()
    if not torch.isfinite(scale):
        raise ValueError(f"the median gradient norm is {scale.item()}: a loss was not finite")
    return scale.item()


def _check_params(params: object) -> list[Tensor]:
    """The trainable tensors of ``params``, an iterable of tensors (as ``torch.optim`` takes);
    at least one."""
    if isinstance(params, Tensor):
        raise TypeError(
            "`params` must be an iterable of tensors (e.g. `model.parameters()`), got a single "
            "Tensor: wrap it in a list"
        )
    try:
        tensors = list(params)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"`params` must be an iterable of tensors, got {type(params).__name__}"
        ) from None
    for tensor in tensors:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`params` must hold tensors only, got a {type(tensor).__name__}")
    trainable = [p for p in tensors if p.requires_grad]
    if not trainable:
        raise ValueError("`params` must hold at least one parameter with requires_grad=True")
    return trainable


def _has_reentrant_checkpoint(root: Tensor) -> bool:
    """Whether the autograd graph of ``root`` holds a reentrant activation checkpoint."""
    seen: set[object] = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _global_dot(first: list[Tensor], second: list[Tensor], device: torch.device) -> Tensor:
    """``sum_i <a_i, b_i>`` without a product buffer: one ``(1, n) @ (n, 1)`` per pair.

    Summed in float64 for float64 tensors, float32 otherwise (as the norms are).
    """
    if not first:
        return torch.zeros((), device=device)
    dtype = torch.float64 if first[0].dtype == torch.float64 else torch.float32
    rows = [a.reshape(1, -1) for a in first]
    cols = [b.reshape(-1, 1) for b in second]
    if hasattr(torch, "_foreach_mm"):
        products = torch._foreach_mm(rows, cols)
    else:  # pragma: no cover - torch without _foreach_mm
        products = [torch.mm(a, b) for a, b in zip(rows, cols, strict=True)]
    return _stack([p.reshape(()).to(dtype) for p in products]).sum()


def _sharded_params(params: list[Tensor]) -> dist.ProcessGroup | None:
    """The shard group of FSDP2 (``DTensor``) parameters, ``None`` for ordinary ones.

    All or none must be sharded, over one device mesh: the norms are reduced in one collective.
    """
    sharded = [_is_sharded(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        raise ValueError(
            "`params` mixes sharded (FSDP2 DTensor) and ordinary parameters: pass the parameters "
            "of one fully_shard-ed model, built after sharding"
        )
    mesh = params[0].device_mesh  # type: ignore[attr-defined]
    if any(p.device_mesh != mesh for p in params):  # type: ignore[attr-defined]
        raise ValueError("`params` are sharded over different device meshes")
    return _shard_group(params[0])


class NormBalancer:
    """Combine the keep and forget gradients as ``g_keep - c g_forget`` (paper §5's superfactor).

    Args:
        params: the parameters being trained (every one that receives gradient: a parameter
            outside this list would get ``g_keep`` only). Those with ``requires_grad=False`` are
            dropped; those whose gradient is ``None`` at ``step`` are skipped.
        mode: ``"fix"`` (default), ``"clip"``, ``"absolute"`` or ``"bilevel"``; see the module
            docstring.
        ratio: target ``||c g_forget|| / ||g_keep||`` for ``"fix"`` and ``"clip"`` (default 0.1).
        target_norm: ``||c g_forget||`` for ``"absolute"`` (required there).
        superfactor: the coefficient ``"clip"`` uses when the ratio does not bind (default 1).
        eta: EraseDiff's ``η`` for ``"bilevel"`` (default 0.1).
        every: refresh ``c`` every this many optimizer steps (``K``); in between a step is one
            backward of ``keep - c * forget`` with the last ``c``. 1 (default) is exact every step.
        eps: added to ``||g_forget||`` (``||g_forget||²`` for ``"bilevel"``) in the rules, and the
            floor of ``||g_forget||`` when there is no keep gradient.
        floor: a forget gradient with ``||g_forget|| <= floor * ||g_keep||`` counts as zero (see
            the module docstring): ``c = 0`` on that step, nothing held from it. The default,
            ``1e-7``, is float32's resolution: added to the keep gradient, such a forget gradient
            would not change a single float32 value of the plain ``keep - s * forget`` gradient.
        forget_floor: ``"absolute"`` only: a forget gradient with ``||g_forget|| <=
            forget_floor`` counts as zero too (default 0: none). With a teacher the keep
            gradient starts at about 0, so ``floor`` sets no floor there, and a batch whose rows
            all drew the keep point (``w_a ≈ 0`` at low ``t``; common with a few rows per
            step) gives a forget gradient of 1e-6 to 1e-8 of its usual size, whose ``c`` held
            for ``every - 1`` steps multiplies the next batches' forget gradients by 1e5 to 1e7.
            ``siss.Unlearner`` sets it to ``ABSOLUTE_FORGET_FLOOR`` times ``ρ`` times the
            calibrated naive-deletion gradient norm, the size a forget gradient has when its
            batch holds forget rows.
        sync: all-reduce the forget gradient across the default (or ``process_group``) group;
            ``None`` (default) does so when ``torch.distributed`` is initialised with more than one
            process. With sharded (FSDP2 ``DTensor``) parameters: all-reduce the norms' partial
            sums over the shard group unless ``False`` (``False`` there gives each rank the
            norms of its own shards: a control, not a training setting).
        process_group: the group DDP reduces over (``None``: the default group). Unused with
            sharded parameters: the shard group is the parameters' device mesh's.
        backward: the backward call, ``backward(tensor, **kwargs)`` with ``retain_graph`` or
            ``inputs`` keywords: ``torch.Tensor.backward`` (default), ``accelerator.backward``,
            or ``lambda t, **kw: scaler.scale(t).backward(**kw)``.

    Host syncs: one read of two flags per ``step`` (is every norm finite? was the forget gradient
    measured?), which decide whether to skip the update and whether to hold ``c``. Everything
    else, ``c`` included, stays on the device.

    Activation checkpointing must be non-reentrant (``use_reentrant=False``, diffusers' default):
    a reentrant checkpoint hides its parameters from the forget backward's ``inputs=``, and the
    first refresh raises a ``ValueError`` saying so.

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> balancer = NormBalancer(model.parameters(), ratio=0.1)
        >>> out = model(torch.randn(8, 3))
        >>> balancer.backward(out.square().mean(), out.mean())
        >>> stats = balancer.step()
        >>> round((stats.coefficient * stats.forget_norm / stats.keep_norm).item(), 4)
        0.1
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        mode: Mode = "fix",
        ratio: float = 0.1,
        target_norm: float | None = None,
        superfactor: float = 1.0,
        eta: float = 0.1,
        every: int = 1,
        eps: float = 1e-12,
        floor: float = 1e-7,
        forget_floor: float | Tensor = 0.0,
        sync: bool | None = None,
        process_group: dist.ProcessGroup | None = None,
        backward: Callable[..., object] | None = None,
    ) -> None:
        self.params = _check_params(params)
        self.mode = check_choice(mode, "mode", MODES)
        self.ratio = check_nonnegative(ratio, "ratio")
        self.superfactor = check_nonnegative(superfactor, "superfactor")
        self.eta = check_nonnegative(eta, "eta")
        if mode == "absolute":
            if target_norm is None:
                raise ValueError("mode='absolute' needs `target_norm`, the forget gradient's norm")
            check_nonnegative(target_norm, "target_norm")
        elif target_norm is not None:
            raise ValueError(f"`target_norm` is used by mode='absolute' only, not {mode!r}")
        self.target_norm = None if target_norm is None else float(target_norm)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be an int >= 1, got {every!r}")
        self.every = every
        if not (isinstance(eps, Real) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"`eps` must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)
        self.floor = check_nonnegative(floor, "floor")
        if forget_floor and mode != "absolute":
            raise ValueError(f"`forget_floor` is used by mode='absolute' only, not {mode!r}")
        if not isinstance(forget_floor, Tensor):
            check_nonnegative(forget_floor, "forget_floor")
        self.forget_floor = forget_floor
        self.sync = sync
        self.process_group = process_group
        self._backward = backward if backward is not None else Tensor.backward
        self._forget: list[Tensor | None] | None = None
        self._refresh: bool | None = None  # this optimizer step's kind, set by its first backward
        self._coefficient: Tensor | None = None
        self._since_refresh = 0
        self._graph_checked = False
        self._shard_group = _sharded_params(self.params)

    def __repr__(self) -> str:
        return (
            f"NormBalancer(mode={self.mode!r}, ratio={self.ratio}, target_norm={self.target_norm}, "
            f"superfactor={self.superfactor}, eta={self.eta}, every={self.every}, eps={self.eps}, "
            f"floor={self.floor}, "
            f"params={len(self.params)})"
        )

    @property
    def coefficient(self) -> Tensor | None:
        """The ``c`` held for amortized steps: the last measured one, ``None`` before any."""
        return self._coefficient

    def state_dict(self) -> dict[str, object]:
        """What a resume needs to go on as an uninterrupted run would: the held ``c`` and the
        steps since it was measured (the rule's settings are the constructor's).

        Examples:
            >>> model = torch.nn.Linear(2, 1)
            >>> balancer = NormBalancer(model.parameters(), every=4)
            >>> out = model(torch.randn(3, 2))
            >>> balancer.backward(out.square().mean(), out.mean())
            >>> _ = balancer.step()
            >>> again = NormBalancer(model.parameters(), every=4)
            >>> again.load_state_dict(balancer.state_dict())
            >>> torch.equal(again.coefficient, balancer.coefficient)
            True
        """
        if self._refresh is not None:
            raise RuntimeError("NormBalancer.state_dict() inside an optimizer step: call step()")
        coefficient = None if self._coefficient is None else self._coefficient.detach().cpu()
        return {"coefficient": coefficient, "since_refresh": self._since_refresh}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore ``state_dict()``'s state (the coefficient moves to the parameters' device)."""
        coefficient = state["coefficient"]
        if coefficient is not None and not isinstance(coefficient, Tensor):
            raise TypeError(f"`coefficient` must be a Tensor or None, got {type(coefficient)}")
        self._coefficient = None if coefficient is None else coefficient.to(self.params[0].device)
        self._since_refresh = int(state["since_refresh"])  # type: ignore[call-overload]
        self._refresh = None
        self._forget = None

    def _distributed(self) -> bool:
        if self.sync is not None:
            return self.sync
        return (
            dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def backward(self, keep: Tensor, forget: Tensor) -> None:
        """Accumulate one micro-batch's gradients; call ``step`` after the last one.

        Args:
            keep: scalar keep term (``LossTerms.keep`` with ``reduction="mean"`` or ``"sum"``)
                of one forward pass.
            forget: scalar forget term (``LossTerms.forget``) of the same forward pass.

        On a refresh step: ``keep`` backward (``retain_graph=True``) into ``.grad``, then
        ``forget`` backward into the forget buffer. On an amortized step: one backward of
        ``keep - c * forget``.
        """
        for value, name in ((keep, "keep"), (forget, "forget")):
            if not isinstance(value, Tensor) or value.ndim != 0:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"`{name}` must be a scalar tensor (a loss with reduction 'mean' or 'sum'), "
                    f"got {shape}"
                )
            if not value.requires_grad:
                raise ValueError(f"`{name}` does not require grad: pass the loss terms themselves")
        if self._refresh is None:
            self._refresh = self._coefficient is None or self._since_refresh >= self.every
        if not self._refresh:
            self._backward(keep - self._coefficient * forget)
            return
        if not self._graph_checked:
            # Once: walking the graph costs Python time per node.
            if _has_reentrant_checkpoint(forget):
                raise ValueError(
                    "`forget` was computed through a reentrant activation checkpoint "
                    "(torch.utils.checkpoint with use_reentrant=True), whose parameters the "
                    "forget backward cannot reach: use `use_reentrant=False` (diffusers' "
                    "default for `enable_gradient_checkpointing`)"
                )
            self._graph_checked = True
        self._backward(keep, retain_graph=True)
        params = self.params
        kept = [p.grad for p in params]
        forget_grads = self._forget if self._forget is not None else [None] * len(params)
        for p, grad in zip(params, forget_grads, strict=True):
            p.grad = grad  # autograd (FSDP: its reduce-scatter) accumulates into the forget buffer
        try:
            if self._shard_group is None:
                self._backward(forget, inputs=params)
            else:  # FSDP's sharded parameters are not graph leaves: `inputs=` would reach none
                self._backward(forget)
        finally:
            self._forget = [p.grad for p in params]
            for p, grad in zip(params, kept, strict=True):
                p.grad = grad

    def step(self) -> BalanceStats:
        """Write ``g_keep - c g_forget`` into ``.grad`` (or skip), end the optimizer step.

        Returns:
            ``BalanceStats``. When ``skipped``, every ``.grad`` is ``None``.
        """
        if self._refresh is None:
            raise RuntimeError("NormBalancer.step() called without a backward() in this step")
        refreshed, self._refresh = self._refresh, None
        if not refreshed:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = _global_norm(grads, self.params[0].device)
            skipped = not bool(torch.isfinite(norm))  # host sync: the skip decision
            if skipped:
                self._clear_grads()
            self._since_refresh += 1
            return BalanceStats(self._coefficient, None, None, skipped, False, False)

        forget, self._forget = self._forget, None
        params = self.params
        sharded = self._shard_group is not None
        if not sharded and self._distributed():
            self._all_reduce([f for f in forget if f is not None])
        pairs = list(zip(params, forget, strict=True))
        both = [(p.grad, f) for p, f in pairs if p.grad is not None and f is not None]
        keep_only = [p.grad for p, f in pairs if p.grad is not None and f is None]
        forget_only = [(p, f) for p, f in pairs if p.grad is None and f is not None]
        keep_grads = [k for k, _ in both] + keep_only
        forget_grads = [f for _, f in both] + [f for _, f in forget_only]
        device = params[0].device
        dot = None
        if sharded:  # FSDP already reduced both gradients; norms from the local shards
            keep_norm, forget_norm, dot = self._sharded_norms(keep_grads, forget_grads, len(both))
        else:
            keep_norm = _global_norm(keep_grads, device)
            forget_norm = _global_norm(forget_grads, device)
        floor = torch.clamp(self.floor * keep_norm, min=self.eps)
        if self.mode == "absolute" and self.forget_floor is not None:
            floor = torch.maximum(floor, torch.as_tensor(self.forget_floor, device=floor.device))
        measurable = forget_norm > floor
        coefficient = torch.where(
            measurable, self._rule(keep_norm, forget_norm, both, device, dot), 0.0
        ).to(keep_norm.dtype)
        finite = torch.isfinite(keep_norm) & torch.isfinite(forget_norm)
        finite = finite & torch.isfinite(coefficient)
        flags = torch.stack([finite, measurable]).tolist()  # host sync: skip? hold c?
        ok, measured = bool(flags[0]), bool(flags[1])
        if not ok:
            self._clear_grads()
            del forget, pairs, both, forget_grads
            self._since_refresh = self.every  # refresh again at the next step
            return BalanceStats(coefficient, keep_norm, forget_norm, True, True, False)
        view = _local if sharded else list  # FSDP: the combination is written shard by shard
        if forget_grads:
            torch._foreach_mul_(view(forget_grads), coefficient)
        if both:
            torch._foreach_sub_(view([k for k, _ in both]), view([f for _, f in both]))
        if forget_only:
            scaled = [f for _, f in forget_only]
            torch._foreach_neg_(view(scaled))
            for p, grad in zip([p for p, _ in forget_only], scaled, strict=True):
                p.grad = grad
        coefficient = coefficient.detach()
        if measured:
            self._coefficient = coefficient
            self._since_refresh = 1
        else:
            self._since_refresh = self.every  # nothing measured: refresh again at the next step
        return BalanceStats(coefficient, keep_norm, forget_norm, False, True, measured)

    def _rule(
        self,
        keep_norm: Tensor,
        forget_norm: Tensor,
        both: list[tuple[Tensor, Tensor]],
        device: torch.device,
        dot: Tensor | None = None,
    ) -> Tensor:
        if self.mode == "fix":
            return self.ratio * keep_norm / (forget_norm + self.eps)
        if self.mode == "clip":
            return (self.ratio * keep_norm / (forget_norm + self.eps)).clamp(max=self.superfactor)
        if self.mode == "absolute":
            return self.target_norm / (forget_norm + self.eps)
        if dot is None:
            dot = _global_dot([k for k, _ in both], [f for _, f in both], device)
        return (self.eta + dot / (forget_norm.square() + self.eps)).clamp(min=0)

    def _sharded_norms(
        self,
        keep_grads: list[Tensor],
        forget_grads: list[Tensor],
        pairs: int,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``||g_keep||``, ``||g_forget||`` (and ``<g_keep, g_forget>`` for ``"bilevel"``) of
        ``DTensor`` shards: each rank's partial sums, stacked and all-reduced in ONE collective
        over the shard group (none with ``sync=False``). No full gradient is gathered. The first
        ``pairs`` entries of both lists belong to the same parameters (the dot product's)."""
        device = self.params[0].device
        keep_local, forget_local = _local(keep_grads), _local(forget_grads)
        sums = [_squared_sum(keep_local, device), _squared_sum(forget_local, device)]
        if self.mode == "bilevel":
            sums.append(_global_dot(keep_local[:pairs], forget_local[:pairs], device))
        if self.sync is False:
            dtype = torch.float64 if any(v.dtype == torch.float64 for v in sums) else torch.float32
            reduced = torch.stack([v.to(dtype) for v in sums])
        else:
            reduced = _all_reduce_sums(sums, self._shard_group)
        dot = reduced[2] if self.mode == "bilevel" else None
        return reduced[0].sqrt(), reduced[1].sqrt(), dot

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        """Average ``tensors`` over the group in place, as DDP averages ``.grad``.

        One asynchronous collective per tensor (communication, not math: no flattening copy).
        """
        if not tensors:
            return
        group = self.process_group
        works = [dist.all_reduce(t, group=group, async_op=True) for t in tensors]
        for work in works:
            work.wait()
        torch._foreach_div_(tensors, float(dist.get_world_size(group)))

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

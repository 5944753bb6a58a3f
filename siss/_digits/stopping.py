"""``--until nonmember`` for the digits commands: stop once the T-shirt is denoised like T-shirts
the model never saw (``siss.stopping.NonmemberStop``), measured against procedurally varied
T-shirts drawn with their own seed, so that the audit's references (seed 1) stay untouched by the
decision to stop."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from siss._cli.parser import flag
from siss._cli.recipe import add_nonmember_flags, resolve_stop_rule
from siss._digits.data import make_tshirt_variants
from siss.stopping import NonmemberStop

STOP_REFERENCE_SEED = 2
"""``make_tshirt_variants``' seed for the stop references: not the audit's (1)."""


def add_until_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--until steps|nonmember`` and the non-member rule's settings."""
    flag(
        parser,
        "--until",
        choices=("steps", "nonmember"),
        default="steps",
        help="steps: train --max_train_steps steps; nonmember: stop earlier, once the T-shirt's "
        "denoising error ranks among --stop_references varied T-shirts (seed 2, not the "
        "audit's) as a non-member's does (--stop_target), checked every --stop_every steps: "
        "where a retrained model puts it, before unlearning overshoots (docs/results.md)",
    )
    add_nonmember_flags(
        parser,
        references=32,
        references_help="varied T-shirts (siss._digits.data.make_tshirt_variants, seed 2) the "
        "--until nonmember rule ranks the T-shirt among",
    )


def check_until(args: argparse.Namespace) -> None:
    """``--until nonmember`` needs the T-shirt: its references are T-shirt variants."""
    if args.until == "nonmember" and args.outlier_image is not None:
        raise ValueError(
            "--until nonmember ranks the T-shirt among T-shirt variants: it needs the T-shirt "
            "(no --outlier_image)"
        )
    if (message := resolve_stop_rule(args)) is not None:
        raise ValueError(message)


def nonmember_stop(
    args: argparse.Namespace, unet: Any, scheduler: Any, outlier: torch.Tensor
) -> NonmemberStop | None:
    """The run's stop rule (``None`` unless ``--until nonmember``); ``outlier`` ``(C, H, W)``."""
    if args.until != "nonmember":
        return None
    channels, size = outlier.shape[0], outlier.shape[-1]
    references, _ = make_tshirt_variants(
        args.stop_references,
        torch.Generator().manual_seed(STOP_REFERENCE_SEED),
        size=size,
        channels=channels,
    )
    return NonmemberStop(
        unet,
        scheduler,
        outlier[None],
        references.to(outlier.device),
        target=args.stop_target,
        every=args.stop_every,
        seed=args.seed,
        noise_draws=4,
        rule=args.stop_rule,
    )


def stop_state(stop: NonmemberStop | None) -> dict[str, Any] | None:
    """``stop.state_dict()`` for state.json (float64 scores as nested lists: exact in JSON)."""
    if stop is None:
        return None
    state = stop.state_dict()
    errors = state["start_reference_errors"]
    return {**state, "start_reference_errors": None if errors is None else errors.tolist()}


def stop_summary(stop: NonmemberStop | None, step: int) -> dict[str, Any] | None:
    """What metrics.json records of the rule: its settings, its checks (each with the
    percentile against the references scored then and against their scores at the start) and
    the step it stopped at (``entered_at``: ``None`` when it ran to ``--max_train_steps``, and
    always with ``--stop_rule level``, ``anneal`` or ``track``, which go on to the last step;
    ``annealed_at``: the step ``anneal`` turned the forget term off, else ``None``)."""
    if stop is None:
        return None
    return {
        "target": stop.target,
        "rule": stop.rule,
        "timesteps": list(stop.timesteps),
        "references": len(stop.references),
        "noise_draws": stop.noise_draws,
        "entered_at": next((c.step for c in stop.history if stop.stops(c)), None),
        "annealed_at": stop.annealed_at,
        "final_step": step,
        "checks": [check.to_dict() for check in stop.history],
    }


def summary_line(summary: dict[str, Any] | None) -> str | None:
    """The line the digits commands print under their table for ``--until nonmember``."""
    if summary is None:
        return None
    last, start = summary["checks"][-1], summary["checks"][0]
    levels = ", ".join(str(t) for t in summary["timesteps"])
    values = ", ".join(f"{p:.2f}" for p in last["per_timestep"])
    if summary.get("rule") == "level":
        where = f"held at the non-member level for {summary['final_step']} steps"
    elif summary.get("rule") == "track":
        where = f"each noise level steered to the target for {summary['final_step']} steps"
    elif summary.get("annealed_at") is not None:
        where = (
            f"forget term off from step {summary['annealed_at']}, the keep term alone to step "
            f"{summary['final_step']}"
        )
    elif summary["entered_at"] is not None:
        where = f"stopped at step {summary['entered_at']}"
    else:
        where = (
            f"did not reach --stop_target {summary['target']:g} (last check: step {last['step']})"
        )
    return (
        f"{where}: the T-shirt's denoising error ranks at percentile {last['percentile']:.2f} "
        f"among {summary['references']} T-shirt variants the model never saw (noise ranks "
        f"{levels}: {values}; {start['percentile']:.2f} before unlearning); a model retrained "
        "without it puts it at about 0.5"
    )

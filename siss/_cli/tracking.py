"""What ``--report_to`` logs of a training step, shared by the commands that train through
``siss.Unlearner`` (``examples/unlearn.py``, ``siss-stable-diffusion``): the loss, its keep and
forget terms, the learning rate and the balancer's statistics, each under the same tag in every
command, so that runs of different commands read alike in one TensorBoard or wandb project.
Only what a step measured is logged: a statistic the step did not compute is left out, never
written as a number."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from siss.recipe import StepResult


def step_log(result: StepResult, lr: float) -> dict[str, float]:
    """What ``--report_to`` logs of one step: the loss and its keep and forget terms, the
    learning rate the step used and, on a step the balancer ran, its coefficient and the
    gradient norms it measured (on a refresh)."""
    values = {f"train/{name}": term.item() for name, term in result.terms._asdict().items()}
    values["train/lr"] = lr
    stats = result.stats
    if stats is not None:
        values["balancer/coefficient"] = stats.coefficient.item()
        for name in ("keep_norm", "forget_norm"):
            if getattr(stats, name) is not None:
                values[f"balancer/{name}"] = getattr(stats, name).item()
    return values

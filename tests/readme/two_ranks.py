"""README.md's loops on two real processes; launched by tests/test_readme.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/readme/two_ranks.py

(``accelerate launch --cpu --num_processes 2`` would silently start ONE process; this asserts
``accelerator.num_processes == 2``.) Each rank runs the setup block and then the unconditional
loop, and again the setup block and the LoRA loop with its NormBalancer, under
``Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)`` on gloo. Per loop
it checks that the ranks drew different first timesteps (a seed per rank), that every rank ran
each of its keep batches, that weights moved on sync steps only, and that the ranks' weights are
bit-identical at the end (DDP, and the balancer's own all-reduce of the forget gradient, kept them
in sync). Rank 0 prints one JSON line; a failed check raises, so the exit code is non-zero.
"""

from __future__ import annotations

import json
from typing import Any


def check_loop(accelerator: Any, loop: str) -> dict[str, Any]:
    import readme_harness as harness
    import torch
    import torch.distributed as dist

    if loop == "readme-loop":
        namespace, recorder = harness.unconditional_namespace(accelerator)
    elif loop == "readme-lora":
        namespace, recorder = harness.lora_namespace(accelerator)
    else:
        namespace, recorder = harness.lora_namespace(accelerator, harness.RECIPE_KEEP_BATCHES)
    harness.run_loop(namespace, recorder, loop)

    world = accelerator.num_processes
    first: list[Any] = [None] * world
    dist.all_gather_object(first, recorder.timesteps[0].tolist())
    final = harness.flat(recorder.params)
    finals: list[Any] = [None] * world
    dist.all_gather_object(finals, final)
    report = {
        "first_timesteps": first,
        "params_equal_across_ranks": all(torch.equal(finals[0], f) for f in finals),
        "steps_per_rank": len(recorder.syncs),
        "batches_per_rank": len(namespace["train_dataloader"]),
    }
    rank = accelerator.process_index
    assert first[0] != first[1], f"{loop}: both ranks drew the first timesteps {first[0]}"
    assert report["params_equal_across_ranks"], f"{loop}: the ranks' weights differ"
    assert report["steps_per_rank"] == report["batches_per_rank"], f"{loop} rank {rank}: {report}"
    if loop == "readme-recipe":
        harness.check_recipe_loop(namespace, recorder)
        scales: list[Any] = [None] * world
        dist.all_gather_object(scales, namespace["unlearner"].scale)
        assert scales[0] == scales[1], f"{loop}: calibrated scales {scales} differ across ranks"
        report["scales"] = scales
        return report
    assert recorder.syncs == harness.expected_syncs(len(recorder.syncs)), recorder.syncs
    assert recorder.changed() == recorder.syncs, f"{loop}: weights moved without a sync"
    assert recorder.balancer_steps == [True] * (sum(recorder.syncs) if loop == "readme-lora" else 0)
    assert torch.isfinite(final).all() and not torch.equal(recorder.snapshots[0], final)
    return report


def main() -> None:
    import torch
    from accelerate import Accelerator

    from siss._cli import release_run

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    assert accelerator.num_processes == 2, f"{accelerator.num_processes} process(es), not 2"
    report: dict[str, Any] = {"num_processes": accelerator.num_processes}
    for loop in ("readme-loop", "readme-lora", "readme-recipe"):
        report[loop] = check_loop(accelerator, loop)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(json.dumps(report), flush=True)
    release_run(accelerator)  # nothing left holding the process group that end_training ends
    accelerator.end_training()


if __name__ == "__main__":
    import os
    import sys

    main()  # a failed check raised above: a non-zero exit code
    # Every check passed and the process group is ended: leave without the interpreter's
    # teardown, where torch's gloo threads aborted a rank once in CI ("terminate called without
    # an active exception", SIGABRT) after the same checks had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

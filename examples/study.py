"""The MNIST-T-shirt study of the paper (Table 2, Fig. 4b) at laptop scale, over several seeds.

Runs every method of the library from the shipped pretrained digits DDPM with ``unlearn.py``'s
``run``, each from its ``siss.UnlearningConfig`` (``METHODS``, through ``unlearn.job``) — naive
deletion, SISS (λ = 0, 0.5, 1; λ = 0.5 also stopped at the non-member level, ``--until
nonmember``, and with each noise level steered to it, ``--stop_rule track``), SISS (No IS),
EraseDiff, NegGrad and ReTrack, with the paper's step counts (300 for the quality-preserving
methods, 100 for the others) — plus the pretrained and the retrained-without-the-outlier
checkpoints, and writes a results table with 95% confidence
intervals over seeds (Markdown and JSON), a plot of the outlier rate against the step per method
(pooled over the seeds, with exact 95% intervals), and the quality-vs-unlearning scatter of
Fig. 4b. Each final model then gets a larger evaluation (``--final_samples``, 10,240 a seed: the
paper's 30,720 over three seeds), in bfloat16 where the CPU has AMX or AVX512-BF16 (checked against
fp32 on the same noise), from which the table takes the rate with its exact interval and the IS- and
FID-style scores; the pretrained model's own spread over disjoint draws of those samples is
printed under it, the yardstick of "quality kept". Runs and evaluation batches already finished
under the output folder are reused, so the study can be stopped and restarted.

``--pretrained_model_name_or_path`` and ``--retrain`` run the same study on another checkpoint
pair, e.g. the rectified-flow pair of ``pretrain.py --process flow`` (the process is read from
the checkpoints' scheduler configs; both must share it); its output goes to
``outputs/study-<pretrained folder>`` unless ``--output_dir`` says otherwise, and the table's
header names the process.

    python -m examples.study --seeds 0 1 2                  # ~4 h on 2 CPU cores
    python -m examples.study --seeds 0 --methods siss-0.5 naive --docs docs/results
    python -m examples.study --seeds 0 --audit   # + siss.audit of each run, against retrain
    python -m examples.study --pretrained_model_name_or_path examples/assets/flow-pretrained \
        --retrain examples/assets/flow-retrain    # -> outputs/study-flow-pretrained
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from examples.unlearn import ASSETS, CLASSIFIER, METHOD_REFUSALS, audit_run, run
from examples.unlearn import job as unlearn_job
from siss import UnlearningConfig
from siss._cli import (
    CommandParser,
    add_audit_flags,
    add_evaluation_flags,
    add_model_flag,
    add_output_flag,
    add_runtime_flags,
    add_tracking_flags,
    flag,
)
from siss._digits import DEFAULT_EVAL_STEPS, PRECISIONS, resolve_precision
from siss._digits.data import load_training_set
from siss._digits.evaluate import Evaluator, is_near
from siss._digits.models import check_sampler, checkpoint_process, load_scheduler, sample_images
from siss._digits.state import DRAWS, write_tensors_atomically
from siss._digits.study import (
    LABELS,
    audit_markdown,
    plot,
    precision_markdown,
    spread_markdown,
    summarize,
    table_markdown,
)
from siss._files import write_json_atomically
from siss.audit import AuditReport, compare

# label: (siss.UnlearningConfig fields, steps); steps as in the paper's Table 2, every other
# field at the recipe's default; RUN_SETTINGS: a method's unlearn.py settings besides them
METHODS: dict[str, tuple[dict[str, Any], int]] = {
    "naive": ({"method": "naive"}, 300),
    # Naive deletion's expected gradient, from SISS's draws with no extra forget weight (s = 0)
    # and the teacher keep target: the same objective without l_x's regression on the drawn noise.
    "naive-teacher": ({"method": "siss", "lam": 0.5, "superfactor": 0.0}, 300),
    "siss-0": ({"method": "siss", "lam": 0.0}, 300),
    "siss-0.5": ({"method": "siss", "lam": 0.5}, 300),
    "siss-0.5-noise": ({"method": "siss", "lam": 0.5, "keep_target": "noise"}, 300),
    # stopped at the T-shirt variants' level (unlearn.py --until nonmember), 300 steps at most
    "siss-0.5-nonmember": ({"method": "siss", "lam": 0.5}, 300),
    # each noise level steered to the variants' level (--until nonmember --stop_rule track), all
    # 300 steps, the forget coefficient measured once (the rule's --balance_every default)
    "siss-0.5-track": ({"method": "siss", "lam": 0.5, "balance_every": 300}, 300),
    "retrack": ({"method": "retrack"}, 300),
    "siss-nois": ({"method": "siss-nois"}, 300),
    "erasediff": ({"method": "erasediff"}, 100),
    "siss-1": ({"method": "siss", "lam": 1.0}, 100),
    "neggrad": ({"method": "neggrad"}, 100),
}
RUN_SETTINGS: dict[str, dict[str, Any]] = {
    "siss-0.5-nonmember": {"until": "nonmember"},
    "siss-0.5-track": {"until": "nonmember", "stop_rule": "track"},
}


def build_parser() -> CommandParser:
    """This script's flags (diffusers' names where diffusers has the flag) and their checks."""
    p = CommandParser(prog="python -m examples.study", description=__doc__.split("\n\n")[0])
    flag(
        p,
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        at_least=0,
        help="a run of every method per seed",
    )
    flag(
        p,
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        metavar="METHOD",
        help="methods to run, from %(choices)s. Default: every method that applies to the "
        "pair's process (flow: all but erasediff)",
    )
    add_model_flag(
        p,
        default=None,
        old=("--pretrained",),
        help="the checkpoint every method starts from. Default: examples/assets/pretrained",
    )
    flag(
        p,
        "--retrain",
        type=Path,
        default=None,
        help="its retrained-without-the-outlier control. Default: examples/assets/retrain",
    )
    add_output_flag(
        p,
        default=None,
        help="where the runs, table.md, results.json and the plots go. Default: outputs/study "
        "for the default pair, outputs/study-<pretrained folder name> for another",
    )
    flag(
        p,
        "--docs",
        type=Path,
        default=None,
        help="also write table.md, results.json and the two plots here (docs/results: the "
        "shipped ones). Default: none",
    )
    evaluation = add_evaluation_flags(
        p,
        eval_samples=2000,
        samples_help="DDPM samples per evaluation; at 2,000 the FID-style score's spread over "
        "evaluation draws (sd 2.2 around 12.9 for the pretrained model) cannot hide a doubling",
        precision=False,
        nll=False,
    )
    flag(
        evaluation,
        "--final_samples",
        type=int,
        default=10240,
        at_least=0,
        help="samples of each final model's evaluation (the table's rate, IS and FID), drawn "
        "apart from the in-run ones with --eval_sampler's steps in --final_precision, in "
        "resumable batches of 1,024: three seeds of 10,240 pool to the paper's 30,720 for the "
        "rate, enough to tell its 0.04%% (naive deletion) from 0%%, and at 10,240 the FID-style "
        "score's own spread is small next to a doubling. 0: the table uses --eval_samples",
    )
    flag(
        evaluation,
        "--final_precision",
        choices=("auto", *PRECISIONS),
        default="auto",
        help="network precision of the final evaluation's sampling; auto: bf16 on a CPU with "
        "AMX or AVX512-BF16 (2.3x faster there), else fp32 (bf16 is ~28x slower without them). "
        "bf16 is checked against fp32 on the same noise, precision_check.json",
    )
    add_tracking_flags(evaluation, eval_every=100)
    training = p.add_argument_group("training")
    flag(
        training,
        "--timesteps",
        type=int,
        nargs="+",
        default=None,
        at_least=0,
        help="unlearn.py --timesteps for every method: a fixed grid index or a 'low high' window. "
        "Default: unlearn.py's (uniform)",
    )
    flag(
        training,
        "--train_batch_size",
        old=("--batch-size",),
        type=int,
        default=None,
        at_least=1,
        help="unlearn.py --train_batch_size for every method. Default: unlearn.py's (64). SISS "
        "(λ=0.5) noises about half its rows from the forget point, so its keep term sees about "
        "half the batch: at 128 its keep gradient is as noisy as naive deletion's at 64 "
        "(docs/results.md)",
    )
    add_runtime_flags(p, device=False)
    add_audit_flags(
        p,
        audit_help="also audit every method's model and the retrained one against the "
        "pretrained model (unlearn.py --audit; the pretrained model once per seed), and add a "
        "table of each model's verdicts and statistics beside the retrained model's: ~1.5 min "
        "per model with the default checks",
        inherit=True,
    )
    p.add_check(check_study)
    return p


def check_study(args: argparse.Namespace) -> None:
    """The checks across flags, now rather than after hours of training: the pair (its
    process, read from the scheduler configs), the methods that apply to it, the sampler, the
    timesteps' count and the audit's settings (as unlearn.py checks them)."""
    default_pair = args.pretrained_model_name_or_path is None and args.retrain is None
    args.pretrained_model_name_or_path = args.pretrained_model_name_or_path or ASSETS / "pretrained"
    args.retrain = args.retrain or ASSETS / "retrain"
    pair = {"--pretrained_model_name_or_path": args.pretrained_model_name_or_path}
    pair["--retrain"] = args.retrain
    processes = []
    for name, folder in pair.items():
        try:
            processes.append(checkpoint_process(folder))
        except ValueError as error:
            reason = "no such folder" if not Path(folder).exists() else error
            raise ValueError(f"{name} {folder}: {reason}") from None
    if processes[0] != processes[1]:
        raise ValueError(
            f"--pretrained_model_name_or_path ({processes[0]}) and --retrain ({processes[1]}) "
            "must be trained with the same process"
        )
    args.process = processes[0]
    refused = [m for m in args.methods or [] if args.process in refusals(m)]
    if refused:
        label = refused[0]
        raise ValueError(f"--methods {label}: {refusals(label)[args.process]}")
    if args.methods is None:
        args.methods = [m for m in METHODS if args.process not in refusals(m)]
    if args.output_dir is None:
        name = "study" if default_pair else f"study-{args.pretrained_model_name_or_path.name}"
        args.output_dir = Path("outputs") / name
    args.final_precision = resolve_precision(args.final_precision)
    args.final_sampler = check_sampler(args.process, args.eval_sampler, "--eval_sampler")
    args.final_steps = args.eval_steps or DEFAULT_EVAL_STEPS[args.process]
    if args.timesteps is not None and len(args.timesteps) > 2:
        values = " ".join(map(str, args.timesteps))
        raise ValueError(f"--timesteps {values}: takes one value (fixed) or two (a window)")
    if args.audit:
        unlearn_job(
            UnlearningConfig(),
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            **audit_settings(args),
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The checked flags of one study (``error``, exit code 2, on a bad one)."""
    return build_parser().parse_args(argv)


def refusals(label: str) -> dict[str, str]:
    """``{process: why}`` for the processes a study method's unlearn.py method refuses."""
    return METHOD_REFUSALS.get(METHODS[label][0]["method"], {})


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The study's evaluation settings of unlearn.py (the sampler and steps left out when
    unset: unlearn.py's defaults for the process)."""
    settings: dict[str, Any] = {"eval_samples": args.eval_samples}
    if args.eval_sampler is not None:
        settings["eval_sampler"] = args.eval_sampler
    if args.eval_steps is not None:
        settings["eval_steps"] = args.eval_steps
    return settings


def check_pair(args: argparse.Namespace) -> None:
    """Refuses an output folder whose finished runs started from another checkpoint pair, or
    were trained on other ``--timesteps``, ``--train_batch_size`` or draws (``unlearn.DRAWS``): they
    would be reused as if they were this study's. Records the pair in a new folder."""
    record = args.output_dir / "pair.json"
    pair = {
        "pretrained": str(Path(args.pretrained_model_name_or_path).resolve()),
        "retrain": str(Path(args.retrain).resolve()),
        "process": args.process,
    }
    if args.timesteps:
        pair["timesteps"] = args.timesteps
    if args.train_batch_size:
        pair["batch_size"] = args.train_batch_size
    pair["draws"] = DRAWS
    # unlearn.py's default for SISS since it was added; siss-0/siss-1 use the noise target since
    # the teacher is refused at λ in {0, 1} (folders made before that are not reused)
    pair["siss_keep_target"] = "teacher; noise at lam 0 and 1"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved != pair:
            what = [k for k in pair.keys() | saved.keys() if saved.get(k) != pair.get(k)]
            if "draws" in what:
                raise SystemExit(
                    f"{args.output_dir} holds runs trained with keep rows drawn with "
                    "replacement, by an older unlearn.py; this one draws them in shuffled epochs "
                    "(siss.loop.BatchPlan): choose another --output_dir"
                )
            values = ", ".join(
                f"{key} {saved.get(key, 'default')} there, {pair.get(key, 'default')} now"
                for key in sorted(what)
            )
            raise SystemExit(
                f"{args.output_dir} holds another study: {sorted(what)} differ ({values}); "
                "choose another --output_dir"
            )
    else:
        write_json_atomically(record, pair)


def audit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The study's audit settings of unlearn.py (those left unset: unlearn.py's defaults)."""
    settings: dict[str, Any] = {"audit": True}
    for name in ("checks", "samples", "steps", "references"):
        value = getattr(args, f"audit_{name}")
        if value is not None:
            settings[f"audit_{name}"] = value
    if args.audit_option:
        settings["audit_option"] = list(args.audit_option)
    return settings


def runtime_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The threads and progress bars of the study, passed on to each unlearn.py run."""
    settings: dict[str, Any] = {"no_progress": args.no_progress}
    if args.threads:
        settings["threads"] = args.threads
    return settings


def recipe(label: str, seed: int, args: argparse.Namespace) -> UnlearningConfig:
    """The ``siss.UnlearningConfig`` of a study method at ``seed``: its fields and steps
    (``METHODS``) and the study's ``--timesteps``; the recipe's defaults otherwise."""
    fields, steps = METHODS[label]
    timesteps = None
    if args.timesteps:
        timesteps = args.timesteps[0] if len(args.timesteps) == 1 else tuple(args.timesteps)
    return UnlearningConfig(**fields, max_train_steps=steps, seed=seed, timesteps=timesteps)


def run_method(label: str, seed: int, args: argparse.Namespace, before: dict) -> dict:
    """A method's run at ``seed`` through ``unlearn.run`` with its recipe config (resumed from
    its newest checkpoint; a finished run's metrics are reused)."""
    out = args.output_dir / f"{label}-seed{seed}"
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text())
    settings: dict[str, Any] = {
        "output_dir": out,
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        **eval_settings(args),
        "eval_every": args.eval_every,
        "track_samples": args.track_samples,
        "resume_from_checkpoint": "latest",
        **runtime_settings(args),
    }
    if args.train_batch_size:
        settings["train_batch_size"] = args.train_batch_size
    settings.update(RUN_SETTINGS.get(label, {}))
    return run(unlearn_job(recipe(label, seed, args), **settings), before=before)


def audit_method(label: str, seed: int, args: argparse.Namespace) -> None:
    """``unlearn.py --audit`` of a finished run (or of the retrained model, ``label`` "retrain",
    as if it were a run's: its folder's ``model`` links to ``--retrain``); the pretrained audit
    shared by the seed's runs.

    A run's audit is reused only if it was made with the same audit settings
    (``audit_flags.json`` next to ``audit_compare.md``); otherwise it is redone.
    """
    out = args.output_dir / f"{label}-seed{seed}"
    if label == "retrain" and not (out / "model").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "model").symlink_to(Path(args.retrain).resolve(), target_is_directory=True)
    config = UnlearningConfig(seed=seed) if label == "retrain" else recipe(label, seed, args)
    audit = audit_settings(args)
    record = out / "audit_flags.json"
    if (
        (out / "audit_compare.md").exists()
        and record.exists()
        and json.loads(record.read_text()) == audit
    ):
        return
    settings = {
        "output_dir": out,
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        **audit,
        "no_progress": args.no_progress,
    }
    before = args.output_dir / f"pretrained-seed{seed}" / "audit.json"
    table = audit_run(unlearn_job(config, **settings), before_path=before)
    write_json_atomically(record, audit)
    print(f"{LABELS[label]}, seed {seed}:\n{table}\n")


def evaluate_checkpoint(label: str, seed: int, args: argparse.Namespace) -> dict:
    """The pair's ``label`` model (pretrained or retrain) evaluated as a run's model is, with
    ``seed``'s evaluation noise; reused once written."""
    out = args.output_dir / f"{label}-seed{seed}" / "metrics.json"
    if out.exists():
        return json.loads(out.read_text())
    checkpoint = model_folder(label, seed, args)
    eval_args = unlearn_job(
        UnlearningConfig(seed=seed),
        pretrained_model_name_or_path=checkpoint,
        no_progress=args.no_progress,
        **eval_settings(args),
    )
    data = load_training_set(seed=0)
    reference = data.images[~data.is_outlier]
    evaluator = Evaluator.from_flags(eval_args, data.outlier, reference, ASSETS / CLASSIFIER)
    unet = UNet2DModel.from_pretrained(checkpoint)
    metrics, _ = evaluator(unet, load_scheduler(checkpoint), eval_args.eval_samples)
    result = {
        "method": label,
        "seed": seed,
        "steps": 0,
        "train_wall_s": 0.0,
        "after": {"step": 0, **metrics},
        "history": [{"step": 0, **metrics}],
    }
    write_json_atomically(out, result)
    return result


def audit_comparisons(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Per label (the pretrained and retrained models, then each method), one
    ``siss.audit.compare`` against the retrained model's audit per seed (``audit_markdown``'s
    input)."""

    def report(label: str, seed: int, name: str) -> AuditReport:
        path = args.output_dir / f"{label}-seed{seed}" / name
        return AuditReport.from_dict(json.loads(path.read_text()))

    retrained = {seed: report("retrain", seed, "audit_after.json") for seed in args.seeds}
    return {  # the pretrained model's audit: audit_before.json of any run of the seed
        label: [compare(None, report(folder, seed, name), retrained[seed]) for seed in args.seeds]
        for label, folder, name in [
            ("pretrained", "retrain", "audit_before.json"),
            ("retrain", "retrain", "audit_after.json"),  # its verdicts; within its own interval
            *((m, m, "audit_after.json") for m in args.methods),
        ]
    }


FINAL_BATCH = 1024  # samples per resumable unit of the final evaluation


def model_folder(label: str, seed: int, args: argparse.Namespace) -> Path:
    """The weights a row of the table describes: a checkpoint, or a run's saved model."""
    if label == "pretrained":
        return Path(args.pretrained_model_name_or_path)
    if label == "retrain":
        return Path(args.retrain)
    return args.output_dir / f"{label}-seed{seed}" / "model"


def final_noise(seed: int, batch: int) -> torch.Generator:
    """The noise of the final evaluation's ``batch``-th batch: apart from the in-run
    evaluation's (seed + 1), the same for every model of a seed, and redrawable alone."""
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + batch)


def final_samples(
    label: str, seed: int, args: argparse.Namespace, batch: int, precision: str, count: int
) -> torch.Tensor:
    """``(count, C, H, W)`` samples in [-1, 1] of the row's model from the batch's noise."""
    unet = UNet2DModel.from_pretrained(model_folder(label, seed, args))
    return sample_images(
        unet,
        load_scheduler(args.pretrained_model_name_or_path).config,
        count,
        sampler=args.final_sampler,
        num_inference_steps=args.final_steps,
        generator=final_noise(seed, batch),
        progress=False,
        precision=precision,
    )


def final_folder(label: str, seed: int, args: argparse.Namespace) -> Path:
    """Where the row's final evaluation keeps its batches: named by every setting they depend on."""
    name = f"final-{args.final_samples}-{args.final_sampler}{args.final_steps}"
    return args.output_dir / f"{label}-seed{seed}" / f"{name}-{args.final_precision}"


def final_evaluation(label: str, seed: int, args: argparse.Namespace) -> dict:
    """Outlier rate, IS- and FID-style scores and class counts of ``--final_samples`` samples
    of the row's model, drawn in batches of ``FINAL_BATCH`` saved one by one (safetensors,
    atomically) under ``final-<N>-<sampler><steps>-<precision>/`` in the run's folder, so a
    stopped study resumes at the first missing batch; the metrics are written to that folder's
    ``metrics.json``. Non-finite samples make every metric "not measured"."""
    folder = final_folder(label, seed, args)
    record = folder / "metrics.json"
    if record.exists():
        return json.loads(record.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    batches = []
    for batch in range(math.ceil(args.final_samples / FINAL_BATCH)):
        path = folder / f"batch-{batch:04d}.safetensors"
        if not path.exists():
            size = min(FINAL_BATCH, args.final_samples - batch * FINAL_BATCH)
            samples = final_samples(label, seed, args, batch, args.final_precision, size)
            write_tensors_atomically(path, {"samples": samples})
            print(f"{label} seed {seed}: final evaluation, batch {batch + 1}", flush=True)
        batches.append(load_file(path)["samples"])
    metrics = {"samples": args.final_samples, **quality_evaluator().quality(torch.cat(batches))}
    write_json_atomically(record, metrics)
    return metrics


def own_spread(label: str, args: argparse.Namespace, batches_per_draw: int) -> dict:
    """IS- and FID-style scores of disjoint draws of ``batches_per_draw * FINAL_BATCH`` samples
    cut from the row's final-evaluation batches over every seed: how far the scores of one
    model move from evaluation noise alone, the yardstick of "quality kept"."""
    draws = [d for seed in args.seeds for d in seed_spread(label, seed, args, batches_per_draw)]
    return {
        "samples_per_draw": min(draw["samples"] for draw in draws),
        "fid": [draw["fid"] for draw in draws],
        "inception_score": [draw["inception_score"] for draw in draws],
    }


def seed_spread(label: str, seed: int, args: argparse.Namespace, batches_per_draw: int) -> list:
    """``own_spread``'s draws of one seed's finished final evaluation, within the seed so that
    every draw is full (a short last one is left out), kept beside its batches
    (``spread-<batches_per_draw>.json``): the table can be made again without them."""
    folder = final_folder(label, seed, args)
    record = folder / f"spread-{batches_per_draw}.json"
    if not record.exists():
        if not (folder / "metrics.json").exists():
            raise RuntimeError(f"{folder}: the final evaluation has not finished")
        paths = sorted(folder.glob("batch-*.safetensors"))
        scores, evaluator = [], quality_evaluator()
        for i in range(0, len(paths) - batches_per_draw + 1, batches_per_draw):
            samples = torch.cat(
                [load_file(path)["samples"] for path in paths[i : i + batches_per_draw]]
            )
            scores.append({"samples": len(samples), **evaluator.quality(samples)})
        write_json_atomically(record, scores)
    return json.loads(record.read_text())


def precision_check(args: argparse.Namespace, labels: list[str]) -> dict:
    """The final evaluation's precision against fp32 on the same noise (the first batch of each
    model of ``labels`` at the first seed): T-shirt counts, samples whose verdict differs, and
    the median pixel change. ``precision_check.json`` in the output folder, reused once there."""
    record = args.output_dir / "precision_check.json"
    if record.exists():
        return json.loads(record.read_text())
    seed, rows = args.seeds[0], {}
    outlier = load_training_set(seed=0).outlier
    for label in labels:
        fp32, low = (
            final_samples(label, seed, args, 0, precision, FINAL_BATCH)
            for precision in ("fp32", args.final_precision)
        )
        near = [is_near(x, outlier) for x in (fp32, low)]
        rows[label] = {
            "samples": FINAL_BATCH,
            "count_fp32": int(near[0].sum()),
            f"count_{args.final_precision}": int(near[1].sum()),
            "verdicts_differing": int((near[0] != near[1]).sum()),
            "median_pixel_change": float((fp32 - low).abs().median()),
        }
    result = {
        "seed": seed,
        "sampler": f"{args.final_sampler}-{args.final_steps}",
        "precision": args.final_precision,
        "models": rows,
    }
    write_json_atomically(record, result)
    return result


def quality_evaluator() -> Evaluator:
    """The IS- and FID-style scores of samples against the clean digits (no sampling)."""
    data = load_training_set(seed=0)
    return Evaluator(data.outlier, data.images[~data.is_outlier], classifier=ASSETS / CLASSIFIER)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_pair(args)
    results: dict[str, list[dict]] = {}
    for label in ("pretrained", "retrain"):
        results[label] = [evaluate_checkpoint(label, seed, args) for seed in args.seeds]
    for label in args.methods:
        results[label] = [
            run_method(label, seed, args, before=pretrained["after"])
            for seed, pretrained in zip(args.seeds, results["pretrained"], strict=True)
        ]
    for label in ["retrain", *args.methods] if args.audit else []:
        for seed in args.seeds:
            audit_method(label, seed, args)
    check = None
    if args.final_samples:
        for label, runs in results.items():
            for seed, result in zip(args.seeds, runs, strict=True):
                result["final"] = final_evaluation(label, seed, args)
        if args.final_precision != "fp32":
            check = precision_check(args, ["pretrained", *args.methods[:1]])
    rows = summarize(results)
    table = table_markdown(rows, args.process)
    spread = None
    if args.final_samples:
        per_seed = math.ceil(args.final_samples / FINAL_BATCH)  # a draw per seed
        spread = [own_spread("pretrained", args, n) for n in sorted({min(2, per_seed), per_seed})]
        table += "\n" + spread_markdown(spread)
    if check is not None:
        table += "\n" + precision_markdown(check)
    if args.audit:
        table += "\n" + audit_markdown(audit_comparisons(args))
    folders = [args.output_dir] + ([args.docs] if args.docs else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.md").write_text(table)
        write_json_atomically(
            folder / "results.json",
            {
                "seeds": args.seeds,
                "process": args.process,
                "rows": rows,
                "pretrained_spread": spread,
                "precision_check": check,
            },
        )
        plot(results, rows, folder)
    print(table)


if __name__ == "__main__":
    main()

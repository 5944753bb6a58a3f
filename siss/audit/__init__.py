"""Unlearning audit: does a diffusion model still hold given images?

``siss.audit.audit(model, scheduler, forget, reference, ...)`` runs the checks (generation,
likelihood, reconstruction and its sweep, membership inference, and Wen et al.'s memorization
score for text-conditional models) and returns an ``AuditReport``; ``python -m siss.audit``
does the same from the command line and writes ``audit.json``, ``audit.md`` and ``audit.png``.
``siss.audit.report`` holds the result types every check returns: ``Estimate`` (a value with its
sample size, interval and status), ``CheckResult`` (its ``verdict``: held, not held, overshot or
undecided), ``AuditReport`` and ``compare`` (two audits, and optionally a reference model's);
``siss.audit.figure.save_figure`` draws a report. See docs/audit.md.

``siss.audit.split`` labels generated images as copies of a memorized training image or not
(``memorization_split``: similarity to a reference image, or the paper's 2-means rule whose tight
cluster is the memorized one, "not found" when there is none), with pixel, VAE
(``vae_features``) or image-encoder (``image_encoder_features``) features.
"""

from siss.audit.report import (
    VERDICTS,
    AuditReport,
    CheckResult,
    Comparison,
    ComparisonRow,
    Estimate,
    compare,
    held_of,
)
from siss.audit.run import ALL_CHECKS, DEFAULT_CHECKS, audit
from siss.audit.split import (
    MemorizationSplit,
    image_encoder_features,
    memorization_split,
    split_by_clustering,
    split_by_reference,
    vae_features,
)

__all__ = [
    "ALL_CHECKS",
    "DEFAULT_CHECKS",
    "VERDICTS",
    "AuditReport",
    "CheckResult",
    "Comparison",
    "ComparisonRow",
    "Estimate",
    "MemorizationSplit",
    "audit",
    "compare",
    "held_of",
    "image_encoder_features",
    "memorization_split",
    "split_by_clustering",
    "split_by_reference",
    "vae_features",
]

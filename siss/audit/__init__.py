"""Unlearning audit: does a diffusion model still hold given images? (work in progress)

``siss.audit.report`` holds the result types every check returns: ``Estimate`` (a value with its
sample size, interval and status), ``CheckResult``, ``AuditReport`` and ``compare``.
"""

from siss.audit.report import AuditReport, CheckResult, Comparison, Estimate, compare

__all__ = ["AuditReport", "CheckResult", "Comparison", "Estimate", "compare"]

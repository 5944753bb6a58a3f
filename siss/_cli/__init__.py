"""What every command shares: the parser (help lines with real defaults, flags checked right
after parsing, old spellings accepted for one release), the flag groups named as in diffusers'
training scripts, and the recipe's flags.

- ``siss._cli.parser``: ``CommandParser``, ``DefaultsHelpFormatter``, ``flag``;
- ``siss._cli.groups``: ``--pretrained_model_name_or_path``, ``--output_dir``, the training,
  checkpoint, logging and runtime groups, ``resolve_device``, ``start_trackers``; the digits
  commands' data, evaluation, tracking, audit and recipe groups;
- ``siss._cli.recipe``: ``--keep_target`` and its group, ``recipe_config``.
"""

from __future__ import annotations

from siss._cli.groups import (
    AUDIT_CHECKS,
    CHECKPOINTS,
    MIXED_PRECISIONS,
    TRACKERS,
    add_audit_flags,
    add_checkpoint_flags,
    add_data_flags,
    add_evaluation_flags,
    add_logging_flags,
    add_model_flag,
    add_output_flag,
    add_recipe_flags,
    add_runtime_flags,
    add_tracking_flags,
    add_training_flags,
    check_timesteps,
    resolve_device,
    start_trackers,
)
from siss._cli.parser import (
    REMOVED_IN,
    CommandParser,
    DefaultsHelpFormatter,
    flag,
    old_spelling,
    range_check,
)
from siss._cli.recipe import RECIPE_FLAGS, add_keep_target_flags, add_method_flags, recipe_config

__all__ = [
    "AUDIT_CHECKS",
    "CHECKPOINTS",
    "MIXED_PRECISIONS",
    "RECIPE_FLAGS",
    "REMOVED_IN",
    "TRACKERS",
    "CommandParser",
    "DefaultsHelpFormatter",
    "add_audit_flags",
    "add_checkpoint_flags",
    "add_data_flags",
    "add_evaluation_flags",
    "add_keep_target_flags",
    "add_logging_flags",
    "add_method_flags",
    "add_model_flag",
    "add_output_flag",
    "add_recipe_flags",
    "add_runtime_flags",
    "add_tracking_flags",
    "add_training_flags",
    "check_timesteps",
    "flag",
    "old_spelling",
    "range_check",
    "recipe_config",
    "resolve_device",
    "start_trackers",
]

"""What every command shares: the parser (help lines with real defaults, flags checked right
after parsing, old spellings accepted for one release), the flag groups named as in diffusers'
training scripts, and the recipe's flags.

- ``siss._cli.parser``: ``CommandParser``, ``DefaultsHelpFormatter``, ``flag``, ``FlagError`` (a
  flag refused once what it names is read: exit 2 through ``exit_on_flag_error``);
- ``siss._cli.groups``: ``--pretrained_model_name_or_path``, ``--output_dir``, the training,
  checkpoint, logging and runtime groups, ``resolve_device``, ``start_trackers`` (or
  ``tracker_options`` and ``tracker_config`` for a command's own Accelerator), ``release_run``
  (what an Accelerator holds of a finished run); the digits commands' data, evaluation,
  tracking, audit and recipe groups;
- ``siss._cli.recipe``: ``--keep_target`` and its group, ``recipe_config``;
- ``siss._cli.tracking``: ``step_log``, what ``--report_to`` logs of a training step.
"""

from __future__ import annotations

from siss._cli.groups import (
    AUDIT_CHECKS,
    CHECKPOINTS,
    MIXED_PRECISIONS,
    TRACKERS,
    add_audit_flags,
    add_checkpoint_flags,
    add_checkpoints_total_limit_flag,
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
    output_folder_error,
    release_run,
    resolve_device,
    start_trackers,
    tracker_available,
    tracker_config,
    tracker_options,
)
from siss._cli.parser import (
    REMOVED_IN,
    CommandParser,
    DefaultsHelpFormatter,
    FlagError,
    exit_on_flag_error,
    flag,
    old_spelling,
    range_check,
)
from siss._cli.recipe import (
    RECIPE_FLAGS,
    add_keep_target_flags,
    add_method_flags,
    add_nonmember_flags,
    recipe_config,
    resolve_stop_rule,
)
from siss._cli.tracking import step_log

__all__ = [
    "AUDIT_CHECKS",
    "CHECKPOINTS",
    "MIXED_PRECISIONS",
    "RECIPE_FLAGS",
    "REMOVED_IN",
    "TRACKERS",
    "CommandParser",
    "DefaultsHelpFormatter",
    "FlagError",
    "add_audit_flags",
    "add_checkpoint_flags",
    "add_checkpoints_total_limit_flag",
    "add_data_flags",
    "add_evaluation_flags",
    "add_keep_target_flags",
    "add_logging_flags",
    "add_method_flags",
    "add_model_flag",
    "add_nonmember_flags",
    "add_output_flag",
    "add_recipe_flags",
    "add_runtime_flags",
    "add_tracking_flags",
    "add_training_flags",
    "check_timesteps",
    "exit_on_flag_error",
    "flag",
    "old_spelling",
    "output_folder_error",
    "range_check",
    "recipe_config",
    "release_run",
    "resolve_device",
    "resolve_stop_rule",
    "start_trackers",
    "step_log",
    "tracker_available",
    "tracker_config",
    "tracker_options",
]

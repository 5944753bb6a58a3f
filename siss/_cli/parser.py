"""The parser every command is built on: help lines that state their real defaults, flags
declared with their range and checked right after parsing (each error names the flag and the
value, exits 2 and comes before any model is loaded or any file written), and the old hyphenated
spellings of renamed flags accepted, hidden and warned about, until ``REMOVED_IN``."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Check = Callable[[argparse.Namespace], None]
REMOVED_IN = "0.3.0"
"""The release that stops accepting the old spellings (``--steps``, ``--batch-size``, ...)."""

# A help text that states its own default: "Default: ...", "default 4000", "(default: ...)",
# "%(default)s", "run: all stages (default)". A mere mention ("unlearn.py's default") does not.
_STATES_DEFAULT = re.compile(
    r"(?i)\bdefault\b\s*[:=]?\s*(?:[\w'\"./<\[(-]|%\()|%\(default\)|\(default\)"
)


def _shown(value: Any) -> str:
    """How a default reads in a help line: lists space-separated, paths below the working
    folder relative to it, ``%`` escaped for argparse's formatting."""
    if isinstance(value, list | tuple):
        text = " ".join(_shown(v) for v in value)
    elif isinstance(value, Path):
        try:
            text = str(value.relative_to(Path.cwd())) if value.is_absolute() else str(value)
        except ValueError:
            text = str(value)
    else:
        text = str(value)
    return text.replace("%", "%%")


class FlagError(SystemExit):
    """A flag's value refused once what it names has been read (a ``--resolution`` the loaded
    pipeline cannot generate, a ``--reference_image`` of another size, an ``--output_dir`` that
    holds another run): the message begins with the flag. A ``SystemExit`` whose ``code`` is the
    message, so it stops a command called from Python like any refusal; a command's ``main``
    catches it with :func:`exit_on_flag_error` and exits with status 2, as argparse's refusals."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


def exit_on_flag_error(prog: str, error: FlagError) -> SystemExit:
    """``error`` printed as argparse prints a refused flag (``prog: error: message`` on stderr),
    and the ``SystemExit(2)`` to raise in its place."""
    print(f"{prog}: error: {error.code}", file=sys.stderr)
    return SystemExit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``ArgumentDefaultsHelpFormatter`` that adds ``(default: X)`` only where it says something:
    not for ``None`` (the help text states what ``None`` resolves to), flags without a value,
    empty lists, or help that already states its default (``Default: ...``, ``%(default)s``).
    Lists are shown space-separated and paths relative to the working folder."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is argparse.SUPPRESS
            or action.nargs == 0
            or (isinstance(default, list | tuple) and not default)
            or _STATES_DEFAULT.search(text)
        ):
            return text
        return f"{text} (default: {_shown(default)})"


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (``DefaultsHelpFormatter`` by default) that runs its flags' checks
    right after parsing: a check raises ``ValueError`` naming the flag and the value, which
    ``parse_args`` turns into ``error`` (usage, the message, exit code 2). ``check`` runs them
    on a namespace built in code (``ValueError`` then), so a command called from Python is held
    to the same rules as one called from the shell."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.checks: list[Check] = []

    def add_check(self, check: Check) -> Check:
        """Runs ``check(args)`` after parsing, in the order added."""
        self.checks.append(check)
        return check

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        """A group whose ``add_check`` adds to this parser's checks."""
        group = super().add_argument_group(*args, **kwargs)
        group.add_check = self.add_check  # type: ignore[attr-defined]
        return group

    def check(self, args: argparse.Namespace) -> argparse.Namespace:
        """Runs every check on ``args`` (a ``ValueError`` names the first bad flag), after
        checking the values of flags with choices (which parsing has done already for a
        namespace that came from ``parse_args``)."""
        for action in self._actions:
            if action.choices is None or action.help is argparse.SUPPRESS:
                continue
            value = getattr(args, action.dest, None)
            for item in value if isinstance(value, list | tuple) else [value]:
                if item is not None and item not in action.choices:
                    choices = ", ".join(map(str, action.choices))
                    name = action.option_strings[0] if action.option_strings else action.dest
                    raise ValueError(f"{name}: {item!r} is not one of {choices}")
        for check in self.checks:
            check(args)
        return args

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed = super().parse_args(args, namespace)
        try:
            self.check(parsed)
        except ValueError as error:
            self.error(str(error))
        return parsed

    def defaults(self) -> argparse.Namespace:
        """Every flag at its default, unchecked: the base of a namespace built in code."""
        return argparse.Namespace(
            **{
                action.dest: action.default
                for action in self._actions
                if action.dest != argparse.SUPPRESS and action.default is not argparse.SUPPRESS
            }
        )


Container = argparse.ArgumentParser | argparse._ArgumentGroup


def _old_spelling_action(base: type[argparse.Action], new: str) -> type[argparse.Action]:
    class OldSpelling(base):  # type: ignore[misc, valid-type]
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
            print(
                f"{parser.prog}: warning: {option_string} is the old spelling of {new}, "
                f"accepted until {REMOVED_IN}",
                file=sys.stderr,
            )
            super().__call__(parser, namespace, values, option_string)

    return OldSpelling


def old_spelling(container: Container, spelling: str, new: str, **kwargs: Any) -> argparse.Action:
    """A hidden option ``spelling`` that does what ``kwargs`` say (``dest=`` the new flag's,
    ``action=`` a registered name) and warns on stderr that ``new`` replaces it."""
    kind = kwargs.pop("action", "store")
    base = container._registry_get("action", kind, kind)
    return container.add_argument(
        spelling,
        action=_old_spelling_action(base, new),
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
        **kwargs,
    )


def _bounds(
    at_least: float | None, above: float | None, at_most: float | None, below: float | None
) -> str:
    low = f"[{at_least:g}" if at_least is not None else f"({above:g}" if above is not None else ""
    high = f"{at_most:g}]" if at_most is not None else f"{below:g})" if below is not None else ""
    if low and high:
        return f"in {low}, {high}"
    if low:
        return (">= " if low[0] == "[" else "> ") + low[1:]
    return ("<= " if high[-1] == "]" else "< ") + high[:-1]


def range_check(
    flag: str,
    dest: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
) -> Check:
    """A check that ``args.<dest>`` (each value of a list; ``None`` passes) is a finite number
    in the range, naming ``flag`` and the value otherwise."""
    rule = _bounds(at_least, above, at_most, below)

    def check(args: argparse.Namespace) -> None:
        value = getattr(args, dest, None)
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is None:
                continue
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise ValueError(f"{flag}: must be a number {rule}, got {item!r}")
            if (
                not math.isfinite(item)
                or (at_least is not None and item < at_least)
                or (above is not None and item <= above)
                or (at_most is not None and item > at_most)
                or (below is not None and item >= below)
            ):
                raise ValueError(f"{flag}: must be {rule}, got {item}")

    return check


def flag(
    container: Container,
    name: str,
    *,
    old: Sequence[str | tuple[str, Any]] = (),
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    below: float | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """Adds the option ``name`` (diffusers' underscore style) to ``container``, a
    ``CommandParser`` or one of its groups, with ``kwargs`` as ``add_argument`` takes them.

    Its old spellings stay accepted, hidden from ``--help``, with a warning, until
    ``REMOVED_IN``: ``name`` with hyphens (``--eval-samples`` for ``--eval_samples``) and each of
    ``old``; an ``(old, const)`` pair is a flag without a value that sets ``const``
    (``("--resume", "latest")``). ``at_least``/``above``/``at_most``/``below`` bound its value,
    checked after parsing (``CommandParser.check``)."""
    if "help" not in kwargs:
        raise TypeError(f"{name}: every flag has a help text")
    action = container.add_argument(name, **kwargs)
    spellings: list[str | tuple[str, Any]] = []
    hyphenated = name[:2] + name[2:].replace("_", "-")
    if hyphenated != name:
        spellings.append(hyphenated)
    spellings += [s for s in old if s != hyphenated]
    same = {k: v for k, v in kwargs.items() if k in ("action", "type", "nargs", "choices", "const")}
    for spelling in spellings:
        if isinstance(spelling, tuple):
            text, const = spelling
            old_spelling(container, text, name, dest=action.dest, action="store_const", const=const)
        else:
            old_spelling(container, spelling, name, dest=action.dest, **same)
    if any(bound is not None for bound in (at_least, above, at_most, below)):
        add_check = getattr(container, "add_check", None)
        if add_check is None:
            raise TypeError(f"{name}: a bounded flag needs a CommandParser (or one of its groups)")
        add_check(
            range_check(
                name, action.dest, at_least=at_least, above=above, at_most=at_most, below=below
            )
        )
    return action

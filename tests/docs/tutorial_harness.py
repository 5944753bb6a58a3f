"""Run the marked code blocks of the tutorials (docs/tutorials/*.md) as written.

A block is marked by ``<!-- test: NAME -->`` on the line before its opening fence, as README.md's
are (``tests/readme/readme_harness.py``). Two kinds:

* ```` ```python ```` blocks run as they are;
* ```` ```diff ```` blocks hold hunks of the patches a user applies to diffusers' training scripts
  (``docs/tutorials/*.patch``). ``lines="after"`` runs the code as it reads after the patch (the
  context and ``+`` lines), ``lines="added"`` only the ``+`` lines (for hunks whose context needs
  what a test cannot load, e.g. a Hugging Face ``datasets`` object). Every other line of the block
  becomes an empty line, so a traceback points at the tutorial's own line numbers.

Names are unique per page; ``run_block`` compiles the code with the markdown file as its file name.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TUTORIALS = Path(__file__).resolve().parents[2] / "docs" / "tutorials"
_MARKED = re.compile(r"^<!-- test: ([\w-]+) -->\n```(python|diff)\n(.*?)^```$", re.M | re.S)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One marked block: its language, the line number of its first code line, its text."""

    language: str
    first_line: int
    text: str


def blocks(page: str | Path) -> dict[str, Block]:
    """``{name: Block}`` of every marked block of a tutorial page, in page order."""
    path = TUTORIALS / page
    text = path.read_text(encoding="utf-8")
    found: dict[str, Block] = {}
    for match in _MARKED.finditer(text):
        name = match.group(1)
        if name in found:
            raise ValueError(f"{path.name} marks two blocks `{name}`")
        first_line = text.count("\n", 0, match.start(3)) + 1
        found[name] = Block(match.group(2), first_line, match.group(3))
    return found


def fenced_languages(page: str | Path) -> list[str]:
    """The language of every fenced block of a page, marked or not, in page order."""
    return [match.group(1) for match in _FENCE.finditer((TUTORIALS / page).read_text("utf-8"))]


def hunk_lines(diff: str) -> list[str]:
    """The hunks of a diff (``@@`` headers and their lines), without its ``---``/``+++`` header."""
    lines = diff.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("@@"))
    return lines[start:]


def code_of(block: Block, lines: Literal["after", "added"] = "after") -> str:
    """A block's Python code; for a diff, its post-patch code or only its added lines."""
    if block.language == "python":
        return block.text
    kept = ("+", " ") if lines == "after" else ("+",)
    code = []
    for line in block.text.splitlines():
        is_header = line.startswith(("@@", "--- ", "+++ "))
        code.append(line[1:] if line[:1] in kept and not is_header else "")
    return textwrap.dedent("\n".join(code) + "\n")


def run_block(
    page: str,
    name: str,
    namespace: dict[str, Any],
    lines: Literal["after", "added"] = "after",
) -> None:
    """``exec`` a marked block of ``page`` in ``namespace``, with the page's line numbers."""
    found = blocks(page)
    if name not in found:
        raise KeyError(f"{page} has no block marked `<!-- test: {name} -->`: {sorted(found)}")
    block = found[name]
    code = "\n" * (block.first_line - 1) + code_of(block, lines)
    exec(compile(code, str(TUTORIALS / page), "exec"), namespace)

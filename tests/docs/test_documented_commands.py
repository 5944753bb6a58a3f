"""The commands README.md and docs/ document, against what they do today (issue 24, item 5).

Every command line of this repository's programs in README.md and docs/**/*.md (fenced shell
blocks and inline code) is extracted; each one that names an output writes under ``outputs/`` (or
outside the repository), each default output is under ``outputs/`` and holds no shipped file, and
the only way a documented command writes a shipped file is a flag that says so (``--docs DIR``)
or one of the few recorded provenance lines below. The cheap ones run as documented (the README's
demo, the audit's inputs and the audit, the weights figure, the Stable Diffusion job on the
planted pipeline), in a temporary folder with tiny settings appended, and the files they write are
compared with the list their documentation gives, parsed from the docs.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# docs/changelog.md only includes CHANGELOG.md: its commands are history, not instructions
DOC_FILES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.name != "changelog.md"),
]

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- the extraction

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_SHELL = {"", "bash", "sh", "shell", "console"}
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")
_SEPARATORS = {"&&", "||", ";", "|"}
_STARTS = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
    r"(?:python -m (?:examples|benchmarks|siss)\.|python (?:examples|benchmarks|docs)/"
    r"|siss-audit\b|siss-stable-diffusion\b|accelerate launch\b|torchrun\b)"
)


@dataclass(frozen=True)
class Command:
    doc: str  # relative to the repository root
    line: int
    program: str  # "examples.unlearn", "siss.audit", "docs/figures/weights.py", ...
    argv: tuple[str, ...]
    comment: str  # the shell comment after it, if any

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.program} {' '.join(self.argv)}"


def _program(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(program, argv)`` of one simple command's tokens, or None when it runs none of ours."""
    for i, token in enumerate(tokens):
        if token in ("siss-audit", "siss-stable-diffusion") and i == 0:
            return {"siss-audit": "siss.audit"}.get(token, "siss.stable_diffusion"), tokens[1:]
        if token == "-m" and i + 1 < len(tokens):
            module = tokens[i + 1]
            if re.match(r"(examples|benchmarks)\.\w+$|siss\.(audit|stable_diffusion)$", module):
                return module, tokens[i + 2 :]
            return None
        if i > 0 and tokens[i - 1] == "python" and token.endswith(".py"):
            if re.match(r"(examples|benchmarks)/\w+\.py$", token):
                return token[:-3].replace("/", "."), tokens[i + 1 :]
            return token, tokens[i + 1 :]
    return None


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose: good enough for flags and paths
        return text.split()


def commands_in(doc: str, text: str) -> list[Command]:
    """The commands of ``text`` (a Markdown file's content) that run one of our programs."""
    found: list[Command] = []
    fences = []
    for fence in _FENCE.finditer(text):
        fences.append(fence.span())
        if fence.group(1) not in _SHELL:
            continue
        first = text.count("\n", 0, fence.start(2)) + 1
        body = fence.group(2)
        for offset, logical in _logical_lines(body):
            code, _, comment = _uncomment(logical)
            segment: list[str] = []
            for token in [*_split(code), ";"]:
                if token not in _SEPARATORS:
                    segment.append(token)
                    continue
                while segment and _ENV.match(segment[0]):
                    segment.pop(0)
                if (hit := _program(segment)) is not None:
                    found.append(
                        Command(doc, first + offset, hit[0], tuple(hit[1]), comment.strip())
                    )
                segment = []
    prose = list(text)
    for start, end in fences:  # blank the fences, keeping the line numbers
        prose[start:end] = re.sub(r"[^\n]", " ", text[start:end])
    prose_text = "".join(prose)
    for span in _INLINE.finditer(prose_text):
        code = " ".join(span.group(1).split())
        if not _STARTS.match(code):
            continue
        tokens = [t for t in _split(code) if not _ENV.match(t)]
        if (hit := _program(tokens)) is not None:
            line = prose_text.count("\n", 0, span.start()) + 1
            found.append(Command(doc, line, hit[0], tuple(hit[1]), ""))
    return found


def _logical_lines(body: str) -> list[tuple[int, str]]:
    """The block's lines with backslash continuations joined: ``(first line offset, text)``."""
    lines, joined, start = [], "", None
    for offset, line in enumerate(body.split("\n")):
        start = offset if start is None else start
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        lines.append((start, joined + line))
        joined, start = "", None
    return lines


def _uncomment(line: str) -> tuple[str, str, str]:
    """``(code, "#", comment)``: a ``#`` after whitespace and outside quotes starts a comment."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], "#", line[i + 1 :]
    return line, "", ""


@cache
def documented() -> tuple[Command, ...]:
    commands: list[Command] = []
    for path in DOC_FILES:
        commands += commands_in(str(path.relative_to(ROOT)), path.read_text(encoding="utf-8"))
    return tuple(commands)


# -------------------------------------------------------------- what each program writes

# The flags that name what a program writes. ``--docs DIR`` says in its name that it writes the
# shipped copies (docs/results, docs/figures); every other output flag must point under outputs/.
OUTPUT_FLAGS = {
    "examples.unlearn": ("--output_dir", "--output-dir"),
    "examples.study": ("--output_dir", "--output-dir", "--docs"),
    "examples.sequential": ("--output_dir", "--output-dir", "--docs"),
    "examples.pretrain": ("--output_dir", "--output-dir"),
    "examples.train_classifier": ("--output_dir", "--output"),
    "examples.audit_digits": ("--output_dir", "--out", "--figure", "--train_membership"),
    "docs/figures/weights.py": ("--out", "--docs"),
    "siss.audit": ("--output_dir", "--out"),
    "siss.stable_diffusion": ("--output_dir", "--out"),
    "benchmarks.gpu": ("--out",),
    "benchmarks.sd_sweep": ("--out",),
    "benchmarks.noise_score": ("--out",),
    # print only
    "benchmarks.step_time": (),
    "benchmarks.methods": (),
    "benchmarks.memory": (),
    "benchmarks.nonmember_levels": (),
}
SAYS_SO = {"--docs"}  # a flag whose name says that it writes the shipped files
# Records of how a shipped model was made, naming the shipped folder on their own command line:
# (doc, flag, value). Nothing else may write into the repository's shipped files.
PROVENANCE = {
    # "`python -m examples.audit_digits --train_membership examples/assets/membership` made it"
    ("docs/audit.md", "--train_membership", "examples/assets/membership"),
    # "The shipped `examples/assets/shapes-pretrained` was trained on that set ...: `...`"
    ("docs/results.md", "--output_dir", "examples/assets/shapes-pretrained"),
}


def _placeholder(value: str) -> bool:
    """``DIR``, ``...``, ``<out>``, ``$OUT/x``: not a path the docs mean literally."""
    return bool(re.search(r"\.\.\.|[<>$\[\]]", value)) or value.isupper()


def explicit_outputs(command: Command) -> list[tuple[str, str]]:
    """``(flag, value)`` of every output the command names."""
    argv, flags = command.argv, OUTPUT_FLAGS[command.program]
    pairs = []
    for i, token in enumerate(argv):
        name, _, inline = token.partition("=")
        if name in flags:
            value = inline or (argv[i + 1] if i + 1 < len(argv) else "")
            if value and not value.startswith("-") and not _placeholder(value):
                pairs.append((name, value))
    return pairs


@cache
def _weights_script():
    spec = importlib.util.spec_from_file_location(
        "docs_figures_weights", ROOT / "docs/figures/weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_outputs(command: Command) -> list[Path]:
    """Where the command writes when it names no output: its program's own parser, run from
    the repository root (checks only: nothing is written)."""
    from examples import audit_digits, pretrain, sequential, study, train_classifier, unlearn

    parsers = {
        "examples.unlearn": (unlearn.parse_args, ("output_dir",)),
        "examples.study": (study.parse_args, ("output_dir",)),
        "examples.sequential": (sequential.parse_args, ("output_dir",)),
        "examples.pretrain": (pretrain.parse_args, ("output_dir",)),
        "examples.train_classifier": (train_classifier.parse_args, ("output_dir",)),
        "examples.audit_digits": (audit_digits.build_parser().parse_args, ("output_dir",)),
        "docs/figures/weights.py": (_weights_script().parse_args, ("out",)),
    }
    if command.program not in parsers:  # its output flag is required, or it writes nothing
        return []
    parse, dests = parsers[command.program]
    args = parse(list(command.argv))
    return [ROOT / getattr(args, dest) for dest in dests]


@cache
def tracked() -> frozenset[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: the shipped files are git's tracked files")
    return frozenset(ROOT / name for name in listed.split("\0") if name)


def _holds_shipped(path: Path) -> bool:
    path = Path(path).resolve()
    return any(p == path or path in p.parents for p in tracked())


def _inside(path: Path, folder: Path) -> bool:
    path = Path(path).resolve()
    return path == folder or folder in path.parents


# ------------------------------------------------------------------------- static checks


def test_the_documented_commands_are_found_and_every_program_is_known():
    commands = documented()
    assert len(commands) > 40, [str(c) for c in commands]
    seen = {(c.doc, c.program) for c in commands}
    for expected in [
        ("README.md", "examples.unlearn"),
        ("README.md", "examples.audit_digits"),
        ("README.md", "siss.audit"),
        ("README.md", "siss.stable_diffusion"),
        ("README.md", "examples.sequential"),
        ("docs/audit.md", "siss.audit"),
        ("docs/math.md", "docs/figures/weights.py"),
        ("docs/stable_diffusion.md", "benchmarks.sd_sweep"),
        ("docs/tutorials/digits.md", "examples.study"),
    ]:
        assert expected in seen, expected
    unknown = sorted(str(c) for c in commands if c.program not in OUTPUT_FLAGS)
    assert not unknown, f"documented programs whose outputs this test does not know: {unknown}"


def test_every_output_a_documented_command_names_is_under_outputs():
    outputs, wrong, used = ROOT / "outputs", [], set()
    for command in documented():
        for flag, value in explicit_outputs(command):
            path = ROOT / value
            if flag in SAYS_SO and _inside(path, ROOT / "docs"):
                continue  # the shipped copies, by a flag that says so
            if _inside(path, outputs) or not _inside(path, ROOT):
                continue
            if (command.doc, flag, value) in PROVENANCE:
                used.add((command.doc, flag, value))
                continue
            wrong.append(f"{command} ({flag} {value})")
    assert not wrong, "documented outputs outside outputs/:\n" + "\n".join(wrong)
    assert PROVENANCE <= used, f"provenance lines no longer documented: {PROVENANCE - used}"


def test_no_documented_command_writes_a_shipped_file_by_default(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' relative paths are the repository root's
    outputs, wrong = ROOT / "outputs", []
    for command in documented():
        if explicit_outputs(command) or "--help" in command.argv:
            continue
        if any(_placeholder(token) for token in command.argv if not token.startswith("-")):
            continue  # `--seed S`, `...`: not a command line its parser can take
        for path in default_outputs(command):
            if not _inside(path, outputs) or _holds_shipped(path):
                wrong.append(f"{command} -> {path.relative_to(ROOT)}")
    assert not wrong, "documented commands whose default output is not under outputs/:\n" + (
        "\n".join(wrong)
    )


def test_the_defaults_are_checked_where_a_program_has_one(monkeypatch):
    """The check above can fail: the README's demo resolves to its documented folder, and a
    program whose default were a shipped folder would be named."""
    monkeypatch.chdir(ROOT)
    demo = next(c for c in documented() if c.doc == "README.md" and c.program == "examples.unlearn")
    assert default_outputs(demo) == [ROOT / "outputs/unlearn/siss-lam0.5-seed0"]
    assert _holds_shipped(ROOT / "examples/assets/pretrained")
    assert not _holds_shipped(ROOT / "outputs/unlearn/siss-lam0.5-seed0")


def test_no_documented_shell_line_copies_over_a_shipped_file():
    wrong = []
    for path in DOC_FILES:
        text = path.read_text(encoding="utf-8")
        for fence in _FENCE.finditer(text):
            if fence.group(1) not in _SHELL:
                continue
            for _, logical in _logical_lines(fence.group(2)):
                tokens = _split(_uncomment(logical)[0])
                if tokens[:1] in (["cp"], ["mv"]) and len(tokens) >= 3:
                    target = ROOT / tokens[-1]
                    if _inside(target, ROOT) and not _inside(target, ROOT / "outputs"):
                        wrong.append(f"{path.relative_to(ROOT)}: {logical.strip()}")
    assert not wrong, "documented copies into the repository's files:\n" + "\n".join(wrong)


def test_the_extraction_sees_fences_inline_code_comments_and_continuations():
    text = (
        "Run `python -m examples.unlearn --seed 1\n--output_dir outputs/x` or\n\n"
        "```bash\nexport OMP_NUM_THREADS=1\n"
        "OMP_NUM_THREADS=1 python -m siss.audit --model m \\\n"
        "    --output_dir docs/here  # a.json\n"
        "cp outputs/a.png docs/a.png\n```\n"
    )
    found = commands_in("x.md", text)
    assert [(c.line, c.program, c.argv, c.comment) for c in found] == [
        (6, "siss.audit", ("--model", "m", "--output_dir", "docs/here"), "a.json"),
        (1, "examples.unlearn", ("--seed", "1", "--output_dir", "outputs/x"), ""),
    ]
    assert explicit_outputs(found[0]) == [("--output_dir", "docs/here")]


# ----------------------------------------------------------------- the commands, run as documented


def _names(text: str) -> list[str]:
    """The file and folder names among the code spans of ``text`` (``metrics.json``,
    ``model/``, ``images/NNNNN.png``; not flags, not words)."""
    spans = (" ".join(s.split()) for s in _INLINE.findall(text))
    return [
        s
        for s in spans
        if re.fullmatch(r"[\w.<>{},*-]+(/[\w.<>{},*-]+)*/?", s)
        and not s.startswith("-")
        and ("." in s or s.endswith("/"))
    ]


def _listed(text: str, start: str, end: str) -> list[str]:
    """The file and folder names in the code spans from ``start`` to the next ``end``."""
    begin = text.index(start)
    return _names(text[begin : text.index(end, begin + len(start))])


def _entries(folder: Path) -> set[str]:
    return {p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _absolute_inputs(argv: tuple[str, ...]) -> list[str]:
    """The documented argv with the repository's own files (models, assets) made absolute, so
    that it runs from a temporary folder; outputs stay relative to it."""
    return [
        str(ROOT / token)
        if not token.startswith(("-", "outputs/")) and "/" in token and (ROOT / token).exists()
        else token
        for token in argv
    ]


@pytest.fixture
def shipped_untouched():
    """Fails the test if a run changed a shipped model, figure or asset."""
    watched = [
        p
        for folder in ("docs", "examples/assets", "tests/assets")
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".png", ".safetensors", ".json", ".md", ".pt")
    ]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched if p.exists()}
    yield
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in watched if p.exists()}
    changed = sorted(str(p.relative_to(ROOT)) for p in before if after.get(p) != before[p])
    assert not changed, f"shipped files written: {changed}"


UNLEARN_TINY = [
    "--max_train_steps", "2", "--train_batch_size", "8", "--eval_samples", "8",
    "--eval_steps", "2", "--nll_probes", "1", "--nll_tolerance", "1e-1",
    "--stop_references", "8", "--no_progress", "--threads", "1",
]  # fmt: skip


def test_the_readme_demo_writes_what_the_readme_and_the_tutorial_list(
    tmp_path, monkeypatch, shipped_untouched
):
    """README "Quickstart" (``python -m examples.unlearn --until nonmember --stop_rule track``)
    and the digits tutorial's demo: the top-level files and folders of the run's folder are the
    ones listed."""
    from examples import unlearn

    demo = next(c for c in documented() if c.doc == "README.md" and c.program == "examples.unlearn")
    assert demo.argv == ("--until", "nonmember", "--stop_rule", "track")
    monkeypatch.chdir(tmp_path)
    unlearn.main([*_absolute_inputs(demo.argv), *UNLEARN_TINY])
    folder = "outputs/unlearn/siss-lam0.5-seed0"
    assert _files(tmp_path) == {f"{folder}/{f}" for f in _files(tmp_path / folder)}
    written = _entries(tmp_path / folder)
    for doc, start in [
        ("README.md", "It writes `samples_before.png`"),
        ("docs/tutorials/digits.md", "It writes `samples_before.png`"),
    ]:
        listed = _listed((ROOT / doc).read_text(encoding="utf-8"), start, f"`{folder}/`")
        assert set(listed) == written, f"{doc} lists {sorted(listed)}; it writes {sorted(written)}"


def test_the_audit_commands_write_what_the_docs_list(tmp_path, monkeypatch, shipped_untouched):
    """docs/audit.md's command block (its first two commands) and the README's comment on the
    audit command: the inputs, the reference figure, one folder per model and compare.md."""
    from examples import audit_digits
    from siss.audit.__main__ import main as audit_main

    first = next(
        c
        for c in documented()
        if c.doc == "docs/audit.md"
        and c.program == "examples.audit_digits"
        and "--figure" in c.argv
    )
    readme = next(c for c in documented() if c.doc == "README.md" and c.program == "siss.audit")
    monkeypatch.chdir(tmp_path)

    audit_digits.main([*_absolute_inputs(first.argv), "--no_progress"])
    text = (ROOT / "docs/audit.md").read_text(encoding="utf-8")
    listed = _listed(text, "The first command writes", ";")
    folder = next(n for n in listed if n.endswith("/"))
    expected = {n if "/" in n else folder + n for n in listed if n != folder}
    assert _files(tmp_path) == expected, f"docs/audit.md lists {sorted(expected)}"

    audit_main([*_absolute_inputs(readme.argv), "--checks", "generation", "--samples", "8",
                "--steps", "2", "--no_progress"])  # fmt: skip
    out = dict(explicit_outputs(readme))["--output_dir"]
    written = _files(tmp_path / out) - {n[len(out) + 1 :] for n in expected}
    names = [Path(v).name for k, v in itertools.pairwise(readme.argv) if k == "--model"]
    listed = [n.strip() for n in readme.comment.split(",")]  # "audit.json/.md/.png, compare.md"
    per_model = [listed[0].split("/")[0]] + [
        listed[0].split(".")[0] + s for s in listed[0].split("/")[1:]
    ]
    documented_files = {f"{m}/{f}" for m in names for f in per_model} | set(listed[1:])
    assert written == documented_files, f"README: {readme.comment!r}"


def test_the_weights_figure_goes_to_outputs_and_to_docs_only_with_the_flag(
    tmp_path, monkeypatch, shipped_untouched
):
    """docs/math.md: ``python docs/figures/weights.py`` writes the one figure it names there;
    ``--docs DIR`` adds DIR/weights.png."""
    script = _weights_script()
    command = next(c for c in documented() if c.doc == "docs/math.md")
    text = (ROOT / "docs/math.md").read_text(encoding="utf-8")
    listed = _listed(text, "which prints those standard-error counts", ";")
    monkeypatch.chdir(tmp_path)
    tiny = ["--rows", "10", "--every", "250", "--gaps", "1"]
    script.main([*command.argv, *tiny])
    assert _files(tmp_path) == set(listed)
    script.main([*command.argv, *tiny, "--docs", "docs/figures"])
    assert _files(tmp_path) == {*listed, "docs/figures/weights.png"}


# The stage table of docs/stable_diffusion.md lists every file the job can write; these are the
# ones this run (LoRA, the whole job, one prompt, no --checkpoints_total_limit) does not leave.
NOT_IN_THIS_RUN = {
    "unet/", "transformer/",  # --full
    "checkpoints/step-NNNNNN/",  # deleted once the weights are saved
    "verify.json", "verify/verify-{train,original}.png",  # the verify stage alone
    "NNN-slug/", "summary.md", "summary.json",  # --prompts
}  # fmt: skip


def _pattern(name: str) -> re.Pattern:
    regex = re.escape(name)
    regex = re.sub(r"N(N)+", r"\\d+", regex)
    regex = regex.replace(r"\*", r"[^/]+")
    regex = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", regex)
    return re.compile(regex + (".+" if name.endswith("/") else ""))


def test_the_stable_diffusion_command_writes_what_its_stage_table_lists(
    tmp_path, monkeypatch, shipped_untouched
):
    """The README's documented CPU command on the planted pipeline (also in
    docs/stable_diffusion.md), with fewer images and 2 steps: every file it writes is in the
    table "written to `--output_dir`" or the paragraph under it, and every entry that this run
    should leave is there."""
    from siss.stable_diffusion import cli

    command = next(
        c
        for c in documented()
        if c.doc == "README.md" and c.program == "siss.stable_diffusion" and "--device" in c.argv
    )
    text = (ROOT / "docs/stable_diffusion.md").read_text(encoding="utf-8")
    begin = text.index("| stage | what | written to `--output_dir` |")
    table = text[begin : text.index("\n\n", begin)]
    listed = [n for row in table.splitlines()[2:] for n in _names(row.rsplit("|", 2)[1])]
    listed += _listed(text, "Every stage first records", "\n\n")
    assert NOT_IN_THIS_RUN <= set(listed), NOT_IN_THIS_RUN - set(listed)
    monkeypatch.chdir(tmp_path)
    cli.run_command([*_absolute_inputs(command.argv),
        "--num_images", "16", "--verify_images", "2", "--max_train_steps", "2",
        "--train_batch_size", "2", "--noise_generations", "2", "--gen_batch_size", "16",
        "--no_progress", "--threads", "1"])  # fmt: skip
    out = tmp_path / dict(explicit_outputs(command))["--output_dir"]
    written = _files(out)
    assert _files(tmp_path) == {str((out / f).relative_to(tmp_path)) for f in written}
    patterns = {name: _pattern(name) for name in listed}
    undocumented = sorted(f for f in written if not any(p.fullmatch(f) for p in patterns.values()))
    assert not undocumented, f"written, not in docs/stable_diffusion.md's table: {undocumented}"
    missing = sorted(
        name
        for name, p in patterns.items()
        if name not in NOT_IN_THIS_RUN and not any(p.fullmatch(f) for f in written)
    )
    assert not missing, f"listed, not written: {missing}"

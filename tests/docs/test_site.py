"""The documentation site renders, offline too (issue 24): the built pages pass
``tests/docs/check_site.py``, the checker itself catches what it is for, the docstrings' examples
are sections that griffe renders as code, and the home page's code is the README's.

Building the site needs the docs extra (``pip install -e ".[docs]"``, about 15 s): that test is
skipped without mkdocs. CI runs the checker on the site it builds anyway, right after
``mkdocs build --strict`` (``python -m tests.docs.check_site build/site``, in the README and
.ci/run).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import siss
from tests.docs import check_site
from tests.readme import readme_harness

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "docs" / "index.md"

# --- the checker, on small pages --------------------------------------------------------------

NAV = '<nav class="md-nav md-nav--primary"><a href="{root}">Home</a>{links}</nav>'


def page(body: str, links: str = "", root: str = "./") -> str:
    """A page with material's primary navigation; ``root``: the site's root from the page."""
    nav = NAV.format(root=root, links=links)
    return f"<html><head></head><body>{nav}<article>{body}</article></body></html>"


def problems(body: str, **pages: str) -> list[str]:
    found, _ = check_site.check_pages({"index.html": page(body), **pages})
    return found


def test_a_clean_page_passes():
    body = (
        '<div class="language-python highlight"><pre><code>&gt;&gt;&gt; 1 + 1\n2</code></pre></div>'
        '<p>See <span class="arithmatex">\\(x \\in X \\setminus A\\)</span>.</p>'
        '<div class="arithmatex">\\[ \\lambda = 0 \\]</div>'
        "<p>The keep set X \\ A.</p>"
        '<link rel="canonical" href="https://example.org/siss/">'
        '<script src="javascripts/mathjax/tex-svg-full.js"></script>'
        '<img src="results/demo_before.png">'
        '<div class="doc-signature highlight"><pre><code>f(\n    a: int,\n)</code></pre></div>'
    )
    assert problems(body) == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # griffe's admonition for `Example:`: the `>>>` become three nested quotes
        ("<details><blockquote><blockquote><blockquote><p>x = 1</p></blockquote></blockquote>"
         "</blockquote></details>", "a quote in a quote"),
        ("<p>&gt;&gt;&gt; import siss</p>", "`>>>` outside a code block"),
        ("<p>draw \\(x\\) from the keep set</p>", "raw TeX outside a formula"),
        ("<p>at $$\\lambda = 0$$</p>", "raw TeX outside a formula"),
        ("<p>the weight \\frac{1}{2}</p>", "raw TeX outside a formula"),
        ('<h2>Draw <span class="arithmatex">\\(x\\)</span></h2>', "a formula in a heading"),
        ("<h2>At λ ∈ {0, 1} { #at-lambda-0-1 }</h2>", "an attribute list shown in a heading"),
        ('<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"></script>',
         "from another host"),
        ('<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">',
         "loads https://fonts.googleapis.com"),
        ('<link rel="preconnect" href="https://fonts.gstatic.com" crossorigin>', "preconnect"),
        ('<img src="//example.org/a.png">', "from another host"),
        ('<div style="background: url(https://example.org/a.png)"></div>', "style attribute"),
        ('<div class="doc-signature highlight"><pre><code>SISSLoss(alphas_cumprod: Tensor | '
         "NoiseSchedule, lam: float = 0.5, superfactor: float | None = None)</code></pre></div>",
         "a signature on one line"),
    ],
)  # fmt: skip
def test_the_checker_finds(body: str, expected: str):
    found = problems(body)
    assert len(found) == 1 and expected in found[0], found


def test_every_page_is_reachable_from_the_navigation():
    linked = page("<p>see <a href='../table/'>the table</a></p>", root="../")
    pages = {
        "results/index.html": linked,
        "table/index.html": page("", root="../"),
        "orphan/index.html": page("", root="../"),
        "404.html": page(""),
    }
    found, _ = check_site.check_pages(
        {"index.html": page("", links='<a href="results/">Results</a>'), **pages}
    )
    assert found == [
        "orphan/index.html: not reachable from the navigation "
        "(list it in mkdocs.yml's nav or link to it)"
    ]


@pytest.mark.parametrize(
    ("page_path", "href", "target"),
    [
        ("api/core/index.html", "../recipe/", "api/recipe/index.html"),
        ("api/core/index.html", "../recipe/#siss.Unlearner", "api/recipe/index.html"),
        ("api/core/index.html", "#siss.SISSLoss", "api/core/index.html"),
        ("index.html", ".", "index.html"),
        ("index.html", "math/", "math/index.html"),
        ("index.html", "results/demo_before.png", None),
        ("index.html", "https://github.com/", None),
    ],
)
def test_links_resolve_to_pages(page_path: str, href: str, target: str | None):
    pages = {"index.html", "math/index.html", "api/core/index.html", "api/recipe/index.html"}
    assert check_site.resolve(page_path, href, pages) == target


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert check_site.main([str(tmp_path)]) == 1
    assert "no index.html" in capsys.readouterr().out
    (tmp_path / "index.html").write_text(page(""), encoding="utf-8")
    assert check_site.main([str(tmp_path)]) == 0
    assert check_site.main([]) == 2


# --- the sources ------------------------------------------------------------------------------

SECTION_TITLE = re.compile(r"(\w[\w ]*):\s*")


def doctest_prompts_outside_examples(path: Path) -> list[str]:
    """``file:line`` of every ``>>>`` line of a docstring that is not in an ``Examples:`` section
    (a Google-style section: a title line, then lines indented under it). griffe renders
    ``Examples:`` as code blocks; ``Example:`` is an admonition and anywhere else ``>>>`` is
    Markdown, where the prompts become nested quotes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            continue
        if not isinstance(node.value.value, str):
            continue
        lines = node.value.value.expandtabs().splitlines()
        indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
        margin = min(indents, default=0)
        section = None
        for number, raw in enumerate(lines):
            line = raw.strip() if number == 0 else raw[margin:]
            if SECTION_TITLE.fullmatch(line):
                section = SECTION_TITLE.fullmatch(line).group(1)
                continue
            if line and not line[0].isspace():
                section = None
            if line.lstrip().startswith(">>>") and section != "Examples":
                found.append(f"{path}:{node.lineno + number}: {line.strip()}")
    return found


def test_docstring_examples_are_examples_sections():
    package = Path(siss.__file__).resolve().parent
    found = [
        problem
        for path in sorted(package.rglob("*.py"))
        for problem in doctest_prompts_outside_examples(path)
    ]
    assert not found, (
        "doctest lines outside an `Examples:` section (griffe renders only those as code; write "
        "`Examples:`, not `Example:` or `Example (...)`; prose before the `>>>` goes inside the "
        "section):\n" + "\n".join(found)
    )


def test_the_source_check_finds_an_example_admonition(tmp_path: Path):
    module = tmp_path / "module.py"
    module.write_text(
        'def f():\n    """Do.\n\n    Example:\n        >>> f()\n\n    Examples:\n'
        '        Prose first:\n\n        >>> f()\n    """\n',
        encoding="utf-8",
    )
    assert doctest_prompts_outside_examples(module) == [f"{module}:5: >>> f()"]


def test_the_home_page_code_is_the_readmes():
    """docs/index.md's quickstart blocks are README.md's, marked with the same names (the README
    runs them: tests/test_readme.py)."""
    home = readme_harness.readme_blocks(HOME)
    readme = readme_harness.readme_blocks()
    assert set(home) == {"readme-recipe", "readme-setup", "readme-loop"}
    for name, (_, code) in home.items():
        assert code == readme[name][1], f"docs/index.md's block {name} differs from README.md's"
    install = re.compile(r"```bash\n(pip install siss-unlearn .*?)```", re.S)
    readme_install = install.search(readme_harness.README.read_text(encoding="utf-8"))
    home_install = install.search(HOME.read_text(encoding="utf-8"))
    assert readme_install and home_install
    assert home_install.group(1) == readme_install.group(1)


# --- the built site ---------------------------------------------------------------------------


def test_the_built_site_passes_the_checks(tmp_path: Path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    if not (ROOT / "mkdocs.yml").is_file():
        pytest.skip("no mkdocs.yml here")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert check_site.check_site(site) == []

"""Check the built documentation site for what a reader would see broken, offline (issue 24).

    mkdocs build --strict && python -m tests.docs.check_site build/site

Every HTML page of the site is parsed (``html.parser``) and must have:

* no ``>>>`` outside ``<pre>``/``<code>``, and no quote nested in a quote: a doctest that
  Markdown rendered as text, or as three nested quotes that swallow its ``>>>`` (an ``Example:``
  section, which griffe reads as an admonition, not as an examples section);
* no raw TeX (``\\(``, ``\\)``, ``\\[``, ``\\]``, ``$$``, a ``\\command``) outside the math
  elements that MathJax typesets (``arithmatex``) and outside code; this also covers the table of
  contents and the page titles, where a formula of a heading shows as its TeX source;
* no formula in a heading (the table of contents and the page title would show its TeX), and no
  ``{ #id }`` shown as text in one (attr_list reads none after a ``{`` of the heading's text);
* no API signature on one unwrapped line (mkdocstrings formats them only where ruff or black is
  installed);
* no script, stylesheet, font, image or frame loaded from another host: the site reads offline;
* every page reachable from the navigation: listed in it, or linked from a page that is.

Exit status 1 with one line per problem (``page:line: what``), 0 with a summary line.
``tests/docs/test_site.py`` builds the site and runs the same checks under pytest.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Elements whose text is code, not prose: a `>>>` or a backslash there is what it should be.
CODE_TAGS = frozenset({"pre", "code", "kbd", "samp", "script", "style", "textarea"})
HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
     "source", "track", "wbr"}
)  # fmt: skip
MATH_CLASS = "arithmatex"  # pymdownx.arithmatex's elements, which MathJax typesets
# Attributes that make the browser fetch a resource when the page loads (<a href> does not).
RESOURCE_ATTRIBUTES = {
    "script": ("src",),
    "img": ("src", "srcset"),
    "source": ("src", "srcset"),
    "iframe": ("src",),
    "frame": ("src",),
    "embed": ("src",),
    "object": ("data",),
    "video": ("src", "poster"),
    "audio": ("src",),
    "track": ("src",),
    "input": ("src",),
    "image": ("href", "xlink:href"),
    "use": ("href", "xlink:href"),
}
# <link rel=...> values that name the page rather than load something.
HARMLESS_LINK_RELS = frozenset({"canonical", "alternate", "author", "license", "help", "search"})

DOCTEST_PROMPT = ">>>"
ATTRIBUTE_LIST = re.compile(r"\{:?\s*[#.][A-Za-z_]")  # `{ #anchor }`, `{: .class }`
SIGNATURE_CLASS = "doc-signature"  # mkdocstrings-python's separate signature
SIGNATURE_WIDTH = 80  # mkdocs.yml's line_length is 60; one line longer than this is unformatted
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\\(?:begin|end)\{|\\[A-Za-z]{2,}")
EXTERNAL_URL = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)
CSS_URL = re.compile(
    r"""(?:url\(\s*['"]?|@import\s+['"])\s*((?:[a-z][a-z0-9+.-]*:)?//[^'")\s]+)""", re.I
)


def is_external(url: str) -> bool:
    """A URL that leaves the site: ``https://...``, ``//host/...`` (not ``data:`` or relative)."""
    return bool(EXTERNAL_URL.match(url))


@dataclass
class _Element:
    tag: str
    code: bool
    math: bool
    heading: bool
    quotes: int  # how many quotes hold it
    primary_nav: bool


@dataclass
class PageReport:
    """What one page holds: its problems and the site pages it links to."""

    path: str  # relative to the site root, with "/"
    problems: list[str] = field(default_factory=list)
    links: set[str] = field(default_factory=set)  # site pages (relative paths) linked from it
    nav_links: set[str] = field(default_factory=set)  # those linked from the primary navigation


class _PageParser(HTMLParser):
    def __init__(self, report: PageReport, site_pages: set[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.report = report
        self.site_pages = site_pages
        self.stack: list[_Element] = []
        self.signature: list[str] | None = None  # the text of the signature being read
        self.signature_depth = 0

    # --- the state of the text being read ---------------------------------------------------------
    def _flag(self, attribute: str) -> bool:
        return bool(self.stack) and getattr(self.stack[-1], attribute)

    def _problem(self, message: str) -> None:
        line, _ = self.getpos()
        self.report.problems.append(f"{self.report.path}:{line}: {message}")

    # --- elements -----------------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        classes = values.get("class", "").split()
        self._check_resources(tag, values)
        if tag == "a" and "href" in values:
            self._record_link(values["href"])
        math = self._flag("math") or MATH_CLASS in classes
        if math and self._flag("heading") and not self._flag("math"):
            self._problem("a formula in a heading (the table of contents shows its TeX)")
        quotes = (self.stack[-1].quotes if self.stack else 0) + (tag == "blockquote")
        if quotes == 2 and tag == "blockquote":  # once per nest, however deep
            self._problem("a quote in a quote: a doctest's `>>>` rendered as Markdown quotes?")
        if tag in VOID_TAGS:
            return
        if SIGNATURE_CLASS in classes and self.signature is None:
            self.signature, self.signature_depth = [], len(self.stack)
        self.stack.append(
            _Element(
                tag=tag,
                code=self._flag("code") or tag in CODE_TAGS,
                math=math,
                heading=self._flag("heading") or tag in HEADINGS,
                quotes=quotes,
                primary_nav=self._flag("primary_nav")
                or (tag == "nav" and "md-nav--primary" in classes),
            )
        )

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        self._check_resources(tag, values)
        if tag == "a" and "href" in values:
            self._record_link(values["href"])

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self.stack) - 1, -1, -1):
            if self.stack[depth].tag == tag:
                del self.stack[depth:]  # closes what was left open inside it too
                if self.signature is not None and len(self.stack) <= self.signature_depth:
                    self._check_signature("".join(self.signature))
                    self.signature = None
                return

    def _check_signature(self, text: str) -> None:
        lines = text.strip().splitlines()
        if len(lines) == 1 and len(lines[0]) > SIGNATURE_WIDTH:
            self._problem(
                f"a signature on one line of {len(lines[0])} characters (not formatted: "
                f"mkdocstrings needs ruff or black): {_excerpt(lines[0], '(')}"
            )

    # --- text -----------------------------------------------------------------------------------
    def handle_data(self, data: str) -> None:
        if self.signature is not None:
            self.signature.append(data)
        if self._flag("code"):
            if self.stack and self.stack[-1].tag == "style":
                for url in CSS_URL.findall(data):
                    self._problem(f"a stylesheet loads {url}")
            return
        if DOCTEST_PROMPT in data:
            self._problem(f"`>>>` outside a code block: {_excerpt(data, DOCTEST_PROMPT)}")
        if self._flag("heading") and ATTRIBUTE_LIST.search(data):
            self._problem(f"an attribute list shown in a heading: {_excerpt(data, '{')}")
        if not self._flag("math"):
            match = RAW_TEX.search(data)
            if match:
                self._problem(f"raw TeX outside a formula: {_excerpt(data, match.group())}")

    # --- resources and links ------------------------------------------------------------------
    def _check_resources(self, tag: str, values: dict[str, str]) -> None:
        for attribute in RESOURCE_ATTRIBUTES.get(tag, ()):
            for url in values.get(attribute, "").split(","):
                url = url.strip().split(" ")[0] if attribute == "srcset" else url
                if url and is_external(url):
                    self._problem(f"<{tag} {attribute}> loads {url} from another host")
        if tag == "link" and is_external(values.get("href", "")):
            rels = set(values.get("rel", "").lower().split())
            if not rels or not rels <= HARMLESS_LINK_RELS:
                self._problem(f"<link rel={values.get('rel')!r}> loads {values['href']}")
        for url in CSS_URL.findall(values.get("style", "")):
            self._problem(f"a style attribute loads {url}")

    def _record_link(self, href: str) -> None:
        target = resolve(self.report.path, href, self.site_pages)
        if target is not None:
            self.report.links.add(target)
            if self._flag("primary_nav"):
                self.report.nav_links.add(target)


def _excerpt(text: str, needle: str, width: int = 40) -> str:
    at = max(text.find(needle), 0)
    snippet = " ".join(text[max(at - width, 0) : at + len(needle) + width].split())
    return repr(snippet)


def resolve(page: str, href: str, site_pages: set[str]) -> str | None:
    """The site page (relative path) that ``href`` on ``page`` points to (``#anchor``: the page
    itself), or None: another host, a file that is not a page."""
    if is_external(href) or href.startswith(("mailto:", "javascript:", "data:", "tel:")):
        return None
    parts = urlsplit(href)
    if not parts.path:
        return page  # "#anchor" or "?query": this page
    if parts.path.startswith("/"):
        return None  # absolute to the host: a site served under a prefix would break it
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(parts.path)))
    if joined.startswith(".."):
        return None
    candidates = [joined, posixpath.join(joined, "index.html")]
    if joined == ".":
        candidates = ["index.html"]
    for candidate in candidates:
        if candidate in site_pages:
            return candidate
    return None


def html_pages(site: Path) -> list[str]:
    return sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html"))


def check_pages(pages: dict[str, str]) -> tuple[list[str], list[PageReport]]:
    """The problems of a site given as ``{relative path: html}``, and the per-page reports."""
    site_pages = set(pages)
    reports = []
    for path, html in sorted(pages.items()):
        report = PageReport(path)
        parser = _PageParser(report, site_pages)
        parser.feed(html)
        parser.close()
        reports.append(report)
    problems = [problem for report in reports for problem in report.problems]
    problems += unreachable(reports)
    return problems, reports


def unreachable(reports: Iterable[PageReport]) -> list[str]:
    """Pages that neither the navigation nor a page reachable from it links to (404.html aside:
    the server shows it, nothing links to it)."""
    reports = list(reports)
    by_path = {report.path: report for report in reports}
    nav = set().union(*(report.nav_links for report in reports)) if reports else set()
    if not nav:
        return ["no page has a navigation (nav.md-nav--primary) to start from"]
    reached, todo = set(nav), list(nav)
    while todo:
        for target in by_path[todo.pop()].links - reached:
            reached.add(target)
            todo.append(target)
    return [
        f"{path}: not reachable from the navigation (list it in mkdocs.yml's nav or link to it)"
        for path in sorted(set(by_path) - reached - {"404.html"})
    ]


def check_site(site: str | Path) -> list[str]:
    """Every problem of the built site in the folder ``site`` (see the module's docstring)."""
    site = Path(site)
    if not (site / "index.html").is_file():
        return [f"{site}: no index.html (build the site first: mkdocs build --strict)"]
    pages = {path: (site / path).read_text(encoding="utf-8") for path in html_pages(site)}
    problems, _ = check_pages(pages)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tests.docs.check_site SITE_FOLDER (e.g. build/site)")
        return 2
    problems = check_site(args[0])
    for problem in problems:
        print(problem)
    pages = len(html_pages(Path(args[0])))
    if problems:
        print(f"{len(problems)} problems in the {pages} pages of {args[0]}")
        return 1
    print(
        f"{pages} pages of {args[0]} checked: doctests in code blocks, no TeX outside formulas "
        "or in headings, signatures formatted, nothing loaded from another host, every page "
        "reachable from the navigation"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

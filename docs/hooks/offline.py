"""mkdocs hooks (``hooks:`` in mkdocs.yml): a site that renders without network.

* **Math.** MathJax 3 is copied into the site at build time from the ``django-static-mathjax``
  package of the ``docs`` extra (MathJax's own release files, packaged for pip; Django is not
  needed). The single-file ``tex-svg-full.js`` build is used: TeX input with every extension
  bundled (nothing is fetched for ``\\boldsymbol`` and the like) and SVG output (the glyphs are
  in the script: no font files to load, which also works from ``file://``). Its configuration is
  ``docs/javascripts/mathjax.js``; its license is copied beside it.
* **Signatures.** mkdocstrings-python formats the separate signatures with ruff (or black) and,
  without either, silently writes each on one unwrapped line: the build fails instead.

``tests/docs/check_site.py`` checks the built pages (no external scripts, no raw TeX).
"""

from __future__ import annotations

import importlib.resources
import importlib.util

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

# Where the site serves MathJax; mkdocs.yml's extra_javascript names the script.
MATHJAX_DIR = "javascripts/mathjax"
MATHJAX_FILES = {"es5/tex-svg-full.js": "tex-svg-full.js", "LICENSE": "LICENSE"}

INSTALL = 'pip install -e ".[docs]"'


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    if not any(importlib.util.find_spec(name) for name in ("ruff", "black")):
        raise PluginError(
            f"formatting the API signatures needs ruff (or black), which the docs extra brings: "
            f"{INSTALL}"
        )
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    try:
        root = importlib.resources.files("mathjax") / "static" / "mathjax"
    except ModuleNotFoundError:
        root = None
    for source, name in MATHJAX_FILES.items():
        path = root.joinpath(*source.split("/")) if root is not None else None
        if path is None or not path.is_file():
            raise PluginError(
                f"MathJax ({source}) not found: the site bundles it from the django-static-mathjax "
                f"package, which the docs extra brings: {INSTALL}"
            )
        files.append(File.generated(config, f"{MATHJAX_DIR}/{name}", abs_src_path=str(path)))
    return files

// MathJax 3 for pymdownx.arithmatex (generic mode), re-run on every page of material's
// instant navigation. MathJax itself (tex-svg-full.js, loaded after this file) is bundled into the
// site at build time by docs/hooks/offline.py: no network is needed to read the formulas.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
  // One copy of each glyph per page (math.md has some 200 formulas).
  svg: { fontCache: "global" },
};

document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});

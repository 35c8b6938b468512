// MathJax 3, served from the site itself (assets/mathjax/, installed at build time by docs/hooks.py).
// Markdown pages: pymdownx.arithmatex wraps each formula in an element of class "arithmatex" with \( \) or \[ \].
// Notebooks: their Markdown cells keep the $...$ and $$...$$ of Jupyter.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    // Nothing of the page is searched for TeX except the formulas of arithmatex and the notebooks' Markdown cells
    // (and what is inside them: their paragraphs and lists); code and pre are skipped by MathJax anyway.
    ignoreHtmlClass: "md-header|md-container",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
};

document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});

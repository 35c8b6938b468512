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
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown|jp-MarkdownOutput",
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

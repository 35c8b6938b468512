"""Build-time pieces of the documentation site (an MkDocs hook module, named in ``mkdocs.yml``).

- **API reference.** One page per public module of the packages that ``pyproject.toml`` installs
  (``[tool.setuptools.packages.find] include``), generated from the source tree: a new module, subpackage or
  top-level package gets its page and its place in the navigation without an edit here. Each page is one
  mkdocstrings directive; ``reference/index.md`` lists the modules with the first line of their docstrings, and
  ``reference/cli.md`` holds the ``--help`` of every ``pdenet`` subcommand.
- **Notebooks.** Every ``examples/*.ipynb`` becomes a page under ``examples/`` (rendered by mkdocs-jupyter with
  the outputs stored in the notebook, not re-executed), and every ``examples/*.py`` is served as a file. The
  MathJax 2 scripts that nbconvert's template would load from a CDN are removed: the site's own MathJax typesets
  the notebooks too.
- **Fences.** The test tags after a fence's language (``python no-run``, ``python needs-data=camvid``)
  are dropped before rendering.
- **MathJax.** Installed from the npm registry (``npm pack mathjax@VERSION``, checked against the registry's
  sha512 integrity) into a cache folder once per machine, and copied into the built site under
  ``assets/mathjax/``: formulas render with no internet access at view time.

The navigation entries ``examples/`` and ``reference/`` of ``mkdocs.yml`` are where the generated pages go.
"""
from __future__ import annotations

import ast
import base64
import fnmatch
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.pdenet")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
REFERENCE = "reference"
NOTEBOOKS = "examples"  # the notebooks' pages sit under examples/ in the site, as in the repository
# Modules left out of the reference: the implementations of the pdenet subcommands (their --help is on
# reference/cli.md) and anything private.
EXCLUDED = ("pdenet.commands",)

MATHJAX_VERSION = "3.2.2"
MATHJAX_INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
# What the site needs of the package: the TeX/MathML-to-CommonHTML bundle, the TeX extensions it loads on demand,
# its web fonts and the contextual menu.
MATHJAX_FILES = ("tex-mml-chtml.js", "input/tex/extensions", "output/chtml/fonts/woff-v2", "ui", "a11y")


# ------------------------------------------------------------------------------------------- modules
def packages() -> list[str]:
    """The top-level packages ``pip install .`` installs: directories with an ``__init__.py`` at the root of the
    tree whose names match the ``include`` patterns of pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    if tomllib is not None:
        config = tomllib.loads(text)
        patterns = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include",
                                                                                                       ["*"])
    else:
        match = re.search(r"^\[tool\.setuptools\.packages\.find\][^\[]*?^include\s*=\s*\[([^\]]*)\]", text, re.M | re.S)
        patterns = re.findall(r"[\"']([^\"']+)[\"']", match.group(1)) if match else ["*"]
    found = [p.name for p in sorted(ROOT.iterdir())
             if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    return found


def modules(package: str) -> list[str]:
    """Dotted names of the public modules of ``package``, the package itself first, subpackages after the
    package's own modules."""
    base = ROOT / package
    names = []
    for path in sorted(base.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or not all((ROOT.joinpath(*parts[:i]) / "__init__.py").is_file()
                                                            for i in range(1, len(parts))):
            continue
        name = ".".join(parts)
        if name.startswith(EXCLUDED):
            continue
        names.append(name)
    # each package (or subpackage) first, then its own modules, then its subpackages
    return sorted(names, key=lambda n: (n.split(".") if is_package(n) else n.split(".")[:-1], not is_package(n), n))


def is_package(name: str) -> bool:
    return (ROOT.joinpath(*name.split(".")) / "__init__.py").is_file()


def source_of(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if is_package(name) else path.with_suffix(".py")


def summary(name: str) -> str:
    """The first sentence-line of a module's docstring, read without importing it."""
    try:
        doc = ast.get_docstring(ast.parse(source_of(name).read_text(encoding="utf-8")))
    except (OSError, SyntaxError):
        doc = None
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ")


def page_path(name: str) -> str:
    parts = name.split(".")
    return "/".join([REFERENCE, *parts, "index.md"]) if is_package(name) else "/".join([REFERENCE, *parts]) + ".md"


def exports(name: str) -> list[tuple[str, str]]:
    """``(public name, dotted module it comes from)`` for the names a package imports from its own modules
    (those in ``__all__`` when it defines one), read from its ``__init__.py`` without importing it."""
    tree = ast.parse(source_of(name).read_text(encoding="utf-8"))
    public = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                public = set(ast.literal_eval(node.value))
            except ValueError:
                public = None
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                shown = alias.asname or alias.name
                if not shown.startswith("_") and (public is None or shown in public):
                    found.append((shown, defined_in(alias.name, f"{name}.{node.module}")))
    return found


def defined_in(attr: str, module: str) -> str:
    """The module that defines ``attr``, following re-exports through subpackages."""
    if is_package(module):
        for shown, source in exports(module):
            if shown == attr:
                return source
    return module


def module_page(name: str) -> str:
    if is_package(name):
        # A package re-exports names documented on its modules' pages: show its docstring, where each of its
        # public names is documented, and its modules, not the re-exported objects a second time.
        lines = [f"::: {name}", "    options:", "      members: false", ""]
        documented = set(modules(name.split(".")[0]))
        names = [(shown, module) for shown, module in exports(name) if module in documented]
        if names:
            lines += ["## Public names", "", "| name | documented in |", "|---|---|"]
            lines += [f"| `{shown}` | [`{module}`]({link(name, module)}) |" for shown, module in names]
            lines.append("")
        lines += ["## Modules", "", "| module | |", "|---|---|"]
        prefix = name + "."
        for other in modules(name.split(".")[0]):
            if other.startswith(prefix) and "." not in other[len(prefix):]:
                lines.append(f"| [`{other}`]({link(name, other)}) | {escape_cell(summary(other))} |")
        return "\n".join(lines) + "\n"
    return f"::: {name}\n"


def link(from_name: str, to_name: str) -> str:
    """Relative link between two generated module pages."""
    here = Path(page_path(from_name)).parent
    return os.path.relpath(page_path(to_name), here).replace(os.sep, "/")


def escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_index() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings of the source tree at build time: one page per public module. The "
             "mathematics behind the names is on the [theory page](../theory.md), worked examples are in the "
             "tutorials, and the command line's options are on [its own page](cli.md).", ""]
    for package in packages():
        lines += [f"## `{package}`", "", "| module | |", "|---|---|"]
        for name in modules(package):
            lines.append(f"| [`{name}`]({page_path(name).removeprefix(REFERENCE + '/')}) | "
                         f"{escape_cell(summary(name))} |")
        lines.append("")
    return "\n".join(lines)


def cli_page() -> str:
    """The ``--help`` of ``pdenet`` and of each subcommand, from the parser of this tree."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("COLUMNS", "100")
    try:
        from pdenet.cli import build_parser  # noqa: PLC0415 (imported here: only the CLI page needs it)
    except Exception as exc:  # noqa: BLE001 - the page says why instead of failing the whole build
        log.warning("the command-line page could not import pdenet.cli: %s", exc)
        return "# Command line\n\nThe parser could not be imported when this site was built.\n"
    finally:
        sys.path.remove(str(ROOT))
    parser = build_parser()
    out = ["# Command line", "",
           "The `pdenet` command and the `--help` of each subcommand, as the parser of this version prints them. "
           "The [tutorials](../tutorials/training.md) show them at work.", "", "```text",
           parser.format_help().rstrip(), "```", ""]
    # argparse has no public way to list subcommands: its sub-parser actions are the ones with a ``choices`` dict
    for action in parser._actions:
        if not isinstance(action.choices, dict):
            continue
        for command, sub in action.choices.items():
            out += [f"## `pdenet {command}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def reference_nav() -> list:
    """Navigation of the API reference: an overview, the command line, then one section per package with its
    modules, each subpackage a nested section."""
    nav: list = [{"Overview": f"{REFERENCE}/index.md"}, {"Command line": f"{REFERENCE}/cli.md"}]
    for package in packages():
        sections: dict[str, list] = {}
        for name in modules(package):
            parent = name if is_package(name) else name.rsplit(".", 1)[0]
            sections.setdefault(parent, []).append({name: page_path(name)})
        entries: list = []
        for parent, pages in sections.items():
            if parent == package:
                entries.extend(pages)
            else:
                entries.append({parent: pages})
        nav.append({package: entries})
    return nav


# ------------------------------------------------------------------------------------------- notebooks
def notebook_paths() -> list[Path]:
    return sorted(EXAMPLES.glob("*.ipynb"))


def notebook_nav() -> list:
    return [f"{NOTEBOOKS}/{path.name}" for path in notebook_paths()]


CDN_MATHJAX = re.compile(r'<script[^>]*src="https?://[^"]*mathjax[^"]*"[^>]*>\s*</script>'
                         r'|<script type="text/x-mathjax-config">.*?</script>', re.S | re.I)


# ------------------------------------------------------------------------------------------- MathJax
def cache_dir() -> Path:
    base = os.environ.get("PDENET_DOCS_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                                 or os.path.expanduser("~/.cache"), "pdenet-docs")
    return Path(base)


def mathjax_package() -> Path:
    """The unpacked npm package ``mathjax@MATHJAX_VERSION`` (its ``es5`` folder), fetched once per machine."""
    target = cache_dir() / f"mathjax-{MATHJAX_VERSION}"
    if (target / "es5" / "tex-mml-chtml.js").is_file():
        return target / "es5"
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to install MathJax for the site (Debian: apt-get install npm)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--silent", "--pack-destination", tmp],
                       check=True, stdout=subprocess.DEVNULL, cwd=tmp)
        tarball = next(Path(tmp).glob("mathjax-*.tgz"))
        data = tarball.read_bytes()
        digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")
        if digest != MATHJAX_INTEGRITY:
            raise RuntimeError(f"mathjax-{MATHJAX_VERSION}.tgz does not match the registry's integrity "
                               f"({digest} != {MATHJAX_INTEGRITY})")
        staging = Path(tempfile.mkdtemp(dir=cache_dir().parent if cache_dir().parent.exists() else None))
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            archive.extractall(staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging / "package"), target)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("MathJax %s installed from the npm registry into %s", MATHJAX_VERSION, target)
    return target / "es5"


# ------------------------------------------------------------------------------------------- MkDocs events
def _fill_nav(nav: list) -> None:
    for i, item in enumerate(nav):
        if isinstance(item, dict):
            for title, value in item.items():
                if value == f"{NOTEBOOKS}/":
                    item[title] = notebook_nav()
                elif value == f"{REFERENCE}/":
                    item[title] = reference_nav()
                elif isinstance(value, list):
                    _fill_nav(value)


def on_config(config):
    if config.get("nav"):
        _fill_nav(config["nav"])
    return config


@event_priority(100)  # before mkdocs-jupyter's own on_files, which must see the notebooks
def on_files(files: Files, config) -> Files:
    use_urls = config["use_directory_urls"]
    site = config["site_dir"]
    generated = {f"{REFERENCE}/index.md": reference_index(), f"{REFERENCE}/cli.md": cli_page()}
    for package in packages():
        for name in modules(package):
            generated[page_path(name)] = module_page(name)
    for path, content in generated.items():
        files.append(File.generated(config, path, content=content))
    for path in notebook_paths():
        # src_dir is the repository root, so that examples/NAME.ipynb is both the page's path and its source
        files.append(File(f"{NOTEBOOKS}/{path.name}", src_dir=str(ROOT), dest_dir=site, use_directory_urls=use_urls))
    for path in sorted(EXAMPLES.glob("*.py")):  # the example scripts, served as files to read or download
        files.append(File(f"{NOTEBOOKS}/{path.name}", src_dir=str(ROOT), dest_dir=site, use_directory_urls=use_urls))
    return files



# Words after the language of a fence are for tests/test_docs.py (``no-run``, ``needs-data=NAME``), not readers.
FENCE_TAGS = re.compile(r"^(\s*```+\s*[\w+-]+)[ \t]+(?:no-run|needs-data=\S+)(?:[ \t]+(?:no-run|needs-data=\S+))*[ \t]*$",
                        re.M)


def on_page_markdown(markdown: str, page, config, files) -> str:
    return FENCE_TAGS.sub(r"\1", markdown)


def on_page_content(html: str, page, config, files) -> str:
    if page.file.src_uri.startswith(f"{NOTEBOOKS}/") and page.file.src_uri.endswith(".ipynb"):
        html = CDN_MATHJAX.sub("", html)
    return html


def on_serve(server, config, builder):
    """``mkdocs serve`` rebuilds when a docstring or a notebook changes, not only a page of docs/."""
    for path in [*(ROOT / package for package in packages()), EXAMPLES]:
        server.watch(str(path))
    return server


def on_post_build(config) -> None:
    source = mathjax_package()
    target = Path(config["site_dir"]) / "assets" / "mathjax"
    for item in MATHJAX_FILES:
        src, dst = source / item, target / item
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)

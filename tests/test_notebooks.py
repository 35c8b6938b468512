"""Run every notebook in ``examples/`` top to bottom, as CI does, without Jupyter.

Each code cell is executed in order in one namespace with ``PDENET_QUICK=1`` (the notebooks' small budget) and
matplotlib's Agg backend. As a script, ``python tests/test_notebooks.py [--full] NOTEBOOK...`` runs the given
notebooks and stores what each cell printed, the value of its last expression and its figures (PNG) as the
cell's outputs, so the notebook reads with results on sites that do not execute it.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import io
import json
import os
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _run_cell(source: str, namespace: dict, name: str) -> list[dict]:
    """Execute one cell like IPython (the value of a final expression is displayed); return nbformat outputs."""
    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(tree, name, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace) if last else None
    outputs = []
    if stdout.getvalue():
        outputs.append({"output_type": "stream", "name": "stdout", "text": stdout.getvalue().splitlines(True)})
    for number in plt.get_fignums():
        buffer = io.BytesIO()
        plt.figure(number).savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": ["<Figure>"]}})
    plt.close("all")
    if value is not None:
        outputs.append({"output_type": "execute_result", "metadata": {}, "execution_count": None,
                        "data": {"text/plain": repr(value).splitlines(True)}})
    return outputs


def run_notebook(path: pathlib.Path) -> dict:
    """Execute the code cells of ``path`` in one namespace; return the notebook with their outputs filled in."""
    notebook = json.loads(path.read_text())
    namespace = {"__name__": "__main__"}
    count = 0
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()):
            raise ValueError(f"{path.name} cell {i}: IPython magics and shell escapes are not supported")
        count += 1
        cell["outputs"] = _run_cell(source, namespace, f"{path.name}[cell {i}]")
        cell["execution_count"] = count
        for output in cell["outputs"]:
            if output["output_type"] == "execute_result":
                output["execution_count"] = count
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PDENET_QUICK", "1")
    notebook = run_notebook(path)
    assert any(c["cell_type"] == "code" and c["outputs"] for c in notebook["cells"])


if __name__ == "__main__":
    # tests/ (this script's folder) must not shadow the packages with its same-named test folders
    sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != pathlib.Path(__file__).resolve().parent]
    args = sys.argv[1:]
    if "--full" in args:
        args.remove("--full")
    else:
        os.environ["PDENET_QUICK"] = "1"
    for arg in args or map(str, NOTEBOOKS):
        target = pathlib.Path(arg)
        result = run_notebook(target)
        target.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"ran {target} and stored its outputs")

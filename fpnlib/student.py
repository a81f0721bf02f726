"""The student edition of the lesson notebooks (``make student``, ``python -m fpnlib student``).

Every "your turn" exercise is a markdown cell, a code cell tagged ``solution`` that holds the
reference solution, and a cell calling a ``fpnlib.exercises.check_*`` function. The student
edition keeps everything but the solutions: each ``solution`` cell keeps its imports and the
signature (and docstring) of each function it defines, whose body becomes a stub that raises
``NotImplementedError`` — so the check cell answers "not written yet" until the student writes it.
All outputs are cleared, so no answer leaks through a printed result either.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"  # what a stripped solution cell is tagged in the student edition
STUB = "# Your turn: write it here\nraise NotImplementedError"


def _text(source) -> str:
    return "".join(source) if isinstance(source, list) else source


def stub_source(source: str) -> str:
    """A solution cell's source with every top-level function body replaced by the stub.

    Kept: top-level imports, and each function's decorators, signature and docstring. Dropped:
    everything else (the answer). A cell without a function becomes the bare stub.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:  # e.g. an IPython magic: nothing of it is kept
        return STUB
    src_lines = source.splitlines()
    imports, functions = [], []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append("\n".join(src_lines[node.lineno - 1:node.end_lineno]))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            doc = node.body[0]
            has_doc = isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
            if src_lines[doc.lineno - 1][:doc.col_offset].strip():  # the body starts on the header's line
                head = src_lines[first - 1:doc.lineno - 1] + [src_lines[doc.lineno - 1][:doc.col_offset].rstrip()]
                indent = " " * (node.col_offset + 4)
            else:
                head = src_lines[first - 1:doc.end_lineno if has_doc else doc.lineno - 1]
                indent = " " * doc.col_offset
            functions.append("\n".join(head + [indent + line for line in STUB.splitlines()]))
    blocks = (["\n".join(imports)] if imports else []) + (functions or [STUB])
    return "\n\n\n".join(blocks)


def student_notebook(nb: dict) -> dict:
    """The student edition of a notebook (JSON dict): solutions stubbed, outputs cleared, papermill's
    run records and injected parameters dropped. Returns a new dict."""
    nb = json.loads(json.dumps(nb))
    nb.get("metadata", {}).pop("papermill", None)
    nb.get("metadata", {}).pop("widgets", None)
    cells = []
    for cell in nb.get("cells", []):
        meta = cell.setdefault("metadata", {})
        tags = meta.get("tags", [])
        if "injected-parameters" in tags:
            continue  # papermill's copy of the parameters of the recorded run
        meta.pop("papermill", None)
        meta.pop("execution", None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            if SOLUTION_TAG in tags:
                cell["source"] = stub_source(_text(cell["source"])).splitlines(keepends=True)
                meta["tags"] = [t for t in tags if t != SOLUTION_TAG] + [EXERCISE_TAG]
        cells.append(cell)
    nb["cells"] = cells
    return nb


def student_edition(notebook_path, out_path) -> Path:
    """Write the student edition of ``notebook_path`` to ``out_path``; returns ``out_path``."""
    nb = json.loads(Path(notebook_path).read_text())
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(student_notebook(nb), indent=1, ensure_ascii=False) + "\n")
    return out_path


def write_student_editions(out_dir, notebooks=None) -> list[Path]:
    """The student edition of every lesson notebook, ``out_dir/NN_*.ipynb``."""
    from fpnlib.reproduce import lesson_notebooks

    return [student_edition(nb, Path(out_dir) / nb.name) for nb in (notebooks or lesson_notebooks())]

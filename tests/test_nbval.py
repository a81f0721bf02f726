"""nbval (lax mode) on the cells of the lessons that print the paper's fixed facts.

A fact cell is marked ``# NBVAL_CHECK_OUTPUT`` in the committed notebook (strides and channels of
C2..C5, strides of P2..P6, the anchor sizes and ratios, Table 1's "# anchors" column, Eq. (1)'s
boundaries). Executing a whole lesson under nbval would rerun its data generation and training
with the committed (cpu) parameters, far too slow for CI, so the test builds a small notebook of
the fact cells WITH THEIR COMMITTED OUTPUTS, preceded by the notebook's own import statements,
and lets nbval re-execute it and compare. That also checks the facts depend on neither training
nor the preset: a fact cell that reads anything but an import fails here.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys


from fpnlib.reproduce import lesson_notebooks

MARK = "NBVAL_CHECK_OUTPUT"
MUST_HAVE_FACTS = ("01", "02", "03", "05", "07")


def _src(cell) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def is_fact(cell) -> bool:
    """Marked as nbval reads it: a comment line that is exactly ``# NBVAL_CHECK_OUTPUT``."""
    return cell["cell_type"] == "code" and any(
        ln.strip().startswith("#") and ln.strip().lstrip("#").strip() == MARK for ln in _src(cell).splitlines())


def fact_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if is_fact(c)]


def import_lines(nb: dict) -> str:
    """Every top-level import statement of the notebook's unmarked code cells, in order."""
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code" or is_fact(cell):
            continue
        src = "\n".join(ln for ln in _src(cell).splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                stmt = "\n".join(lines[node.lineno - 1:node.end_lineno])
                if stmt not in out:
                    out.append(stmt)
    return "\n".join(out)


def facts_cells(nb: dict, tag: str) -> list[dict]:
    """The notebook's imports, then its fact cells with their committed outputs (ids prefixed by ``tag``)."""
    imports = {"cell_type": "code", "execution_count": 1, "id": f"{tag}-imports", "metadata": {}, "outputs": [],
               "source": import_lines(nb)}
    # nbval skips a cell with outputs but no execution count as "unrun": number them
    return [imports] + [dict(c, id=f"{tag}-{c['id']}", metadata={}, execution_count=1) for c in fact_cells(nb)]


def run_nbval(path, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", str(path),
                           "-p", "no:cacheprovider", "-q", "-rf", "--nbval-cell-timeout=120", "-o", "addopts="],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


WITH_FACTS = [p for p in lesson_notebooks() if fact_cells(json.loads(p.read_text()))]


def test_lessons_mark_their_facts():
    marked = {p.name[:2] for p in WITH_FACTS}
    assert set(MUST_HAVE_FACTS) <= marked, f"no {MARK} cell in notebook(s) {sorted(set(MUST_HAVE_FACTS) - marked)}"
    for path in WITH_FACTS:
        for cell in fact_cells(json.loads(path.read_text())):
            assert cell["outputs"], f"{path.name}: fact cell {cell.get('id')} has no committed output to compare with"


def test_facts_match_committed_outputs(tmp_path):
    """One kernel for all lessons (a kernel start costs seconds): each lesson's imports, then its
    facts. To prove the comparison is real, one more copy of a fact cell carries a committed
    output changed by one digit: exactly that cell must fail, every other cell must pass."""
    cells, where = [], {}
    for path in WITH_FACTS:
        nb = json.loads(path.read_text())
        for cell in facts_cells(nb, path.stem[:2]):
            where[len(cells)] = f"{path.name}: {cell['id']}"
            cells.append(cell)
    counts = next(c for c in cells if "47,250" in "".join(o.get("text", "") if isinstance(o.get("text"), str)
                                                            else "".join(o.get("text", [])) for o in c["outputs"]))
    changed = json.loads(json.dumps(counts))
    changed["id"] = "changed-fact"
    for out in changed["outputs"]:
        out["text"] = "".join(out["text"]).replace("47,250", "47,251")
    where[len(cells)] = "the deliberately changed copy"
    cells.append(changed)
    first = json.loads(WITH_FACTS[0].read_text())
    path = tmp_path / "facts.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": first["metadata"], "nbformat": 4, "nbformat_minor": 5}))

    result = run_nbval(path, tmp_path)
    failed = sorted(int(n) for n in re.findall(r"^FAILED facts\.ipynb::Cell (\d+)", result.stdout, flags=re.M))
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert failed == [len(cells) - 1], (f"failed cells: {[where.get(n, n) for n in failed]}; expected only "
                                        f"the changed copy\n{report}")
    passed = re.search(r"(\d+) passed", result.stdout)
    assert passed and int(passed.group(1)) == len(cells) - 1, report

"""The paper's published numbers (Tables 1-6), a copy of ``shared/reference/fpn_paper_tables.json``.

They fill the "paper" columns beside our measurements; they are data read from the PDF, never
computed here.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

PAPER_TABLES = Path(__file__).with_name("fpn_paper_tables.json")


@lru_cache(maxsize=1)
def paper_tables() -> dict:
    """The whole reference file (``source``, ``setting``, ``table1_rpn`` … ``runtime``)."""
    return json.loads(PAPER_TABLES.read_text())


def paper_rows(table: str) -> dict[str, dict]:
    """``{row_key: {column: value}}`` of one table, e.g. ``paper_rows("table1_rpn")["c_fpn"]["AR1k"]``."""
    t = paper_tables()[table]
    return {key: dict(zip(t["columns"], values)) for key, values in t["rows"].items()}

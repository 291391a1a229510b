"""Each table as markdown and JSON, beside the paper's published figures (``published.json``)."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from isg.utils import write_text_atomic

PUBLISHED = Path(__file__).with_name("published.json")


def published() -> dict:
    """The paper's figures per table and row (null where not transcribed): ``{"source", "about", "tables": {...}}``."""
    return json.loads(PUBLISHED.read_text())


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _paper_cell(values: dict | None) -> str:
    """The published figures of one row, e.g. ``pcc 0.412`` or ``vs HE2RNA +7.5 %``; ``-`` when none is transcribed."""
    if not values:
        return "-"
    shown = [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()
             if value is not None and key not in ("bits", "note", "quoted in")]
    return ", ".join(shown) or "-"


def cell(row: dict, column: str, paper: dict) -> str:
    """One markdown cell of ``row``."""
    if column == "paper":
        return _paper_cell(paper.get(row.get("paper_row")) if row.get("paper_row") else None)
    if row.get("skipped") and column not in ("name", "selector", "rule", "reading"):
        return "-"
    if column in ("pcc", "auc"):
        sd = row.get(f"{column}_sd")
        return _number(row.get(column)) + (f" ± {sd:.3f}" if sd is not None else "")
    if column == "l2":
        sd = row.get("l2_sd")
        return _number(row.get("l2"), 4) + (f" ± {sd:.4f}" if sd is not None else "")
    if column in ("floor", "precision", "recall"):
        return _number(row.get(column))
    if column == "kept":
        return f"{row['kept_mean']:.1f} (min {row['kept_min']})" if "kept_mean" in row else "-"
    if column in ("cut_bits", "paper_bits"):
        return f"{row[column]:.3g}" if row.get(column) is not None else "-"
    if column == "z":
        return f"{row['z']:+.2f}" if row.get("z") is not None else "-"
    if column == "seconds":
        return f"{row['seconds']:.0f}" if "seconds" in row else "-"
    if column == "significant":
        value = row.get("significant")  # mean over split seeds
        return "-" if value is None else f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    value = row.get(column)
    return "-" if value is None else str(value)


HEADERS = {"pcc": "PCC", "l2": "L2 (MSE)", "auc": "AUC", "floor": "floor", "kept": "kept / slide", "paper_bits": "paper bits",
           "cut_bits": "cut (bits)", "z": "cut (sigma)", "features": "features (extractor; loss terms)", "seconds": "s",
           "paper": "paper", "significant": "significant", "precision": "signal precision", "recall": "signal recall",
           "under_floor": "under floor"}


def markdown(table: dict, setting: list[str], paper: dict) -> str:
    columns = table["columns"]
    lines = [f"### {table['title']}", "", *setting, ""]
    lines.append("| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for row in table["rows"]:
        name = row["name"] + (f" ({row['note']})" if row.get("note") else "")
        lines.append("| " + " | ".join(name if c == "name" else cell(row, c, paper).replace("|", "/") for c in columns) + " |")
    if table["notes"]:
        lines += ["", *table["notes"]]
    if table["checks"]:
        lines += ["", "Checks (statements about these results that could have been false):"]
        lines += [f"- {'holds' if c['holds'] else 'FAILS'}: {c['claim']} ({c['detail']})" for c in table["checks"]]
    return "\n".join(lines) + "\n"


def machine() -> str:
    return f"{platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def write_table(out_dir: Path, table: dict, setting: list[str], context: dict) -> tuple[Path, Path]:
    """``<out_dir>/<id>.md`` and ``<id>.json`` (the rows, the setting, the published figures, the checks), atomically."""
    tables = published()["tables"]
    paper = tables.get(table["id"], {}).get("rows", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{table['id']}.md", out_dir / f"{table['id']}.json"
    write_text_atomic(md, markdown(table, setting, paper))
    payload = {**table, "setting": setting, "published": tables.get(table["id"], {}), **context}
    write_text_atomic(js, json.dumps(payload, indent=1, default=float))
    return md, js


__all__ = ["PUBLISHED", "cell", "machine", "markdown", "published", "write_table"]

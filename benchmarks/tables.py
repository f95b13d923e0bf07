"""A benchmark's results written twice: the record as JSON, and a markdown table beside it (printed too)."""

from __future__ import annotations

import json
import os


def write_results(stem: str, record: dict, title: str, note: str, header: list[str], rows: list[list[str]]) -> None:
    """`stem`.json holds `record`; `stem`.md a title, a note (the command, the setting) and the table."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    lines = [f"# {title}", "", note, "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

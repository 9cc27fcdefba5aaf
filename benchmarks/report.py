"""What every per-row benchmark script ends with: its rows printed as a table and written,
with what was measured on, as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def report(rows: list[dict], columns: list[tuple[str, str, str]], out: str | Path, **meta: object) -> None:
    """Print `rows` as a table, one column per (header, key, format spec), and write
    {**meta, "rows": rows} to `out`."""
    cells = [[format(row[key], spec) for _, key, spec in columns] for row in rows]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (header, _, _) in enumerate(columns)]
    print("  ".join(header.rjust(w) for (header, _, _), w in zip(columns, widths)))
    for line in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {out}")

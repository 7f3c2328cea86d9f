"""Print a run folder's schema: every table's columns and dtypes, and the manifest's key paths and value types.

    python scripts/schema_snapshot.py results/<run_id> > before.txt
    ... change the code, run the same spec again ...
    python scripts/schema_snapshot.py results/<run_id> > after.txt
    diff before.txt after.txt                   # empty when a refactor changed no column and no manifest key

Values are left out (times, ids and paths differ between any two runs); what is compared is shape: the tables
under RUN/<table>/ (parquet parts, read together), the JSON/JSONL files' keys, and the manifest's key paths
with the JSON type at each (lists of objects are merged element-wise into `key[]`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq


def json_paths(value: object, prefix: str = "") -> set[str]:
    """`path: type` for every key path in a JSON value; dict keys that are data (ids, hashes) still count."""
    if isinstance(value, dict):
        out = {f"{prefix or '.'}: object"}
        for k, v in value.items():
            out |= json_paths(v, f"{prefix}.{k}")
        return out
    if isinstance(value, list):
        out = {f"{prefix}: list"}
        for v in value:
            out |= json_paths(v, f"{prefix}[]")
        return out
    kind = {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}[type(value)]
    return {f"{prefix}: {kind}"}


def table_schema(folder: Path) -> list[str]:
    parts = sorted(folder.glob("*.parquet"))
    if not parts:
        return [f"{folder.name}/: no parquet parts"]
    fields: dict[str, set[str]] = {}
    for p in parts:
        for field in pq.read_schema(p):
            fields.setdefault(field.name, set()).add(str(field.type))
    return [f"{folder.name}/{name}: {' | '.join(sorted(types))}" for name, types in sorted(fields.items())]


def snapshot(run: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted(run.iterdir()):
        if path.is_dir():
            files = len(list(path.iterdir()))
            lines += table_schema(path) if any(path.glob("*.parquet")) else [f"{path.name}/: {files} files, no parquet"]
        elif path.suffix == ".json":
            lines += [f"{path.name}{p}" for p in sorted(json_paths(json.loads(path.read_text())))]
        elif path.suffix == ".jsonl":
            keys: set[str] = set()
            for line in path.read_text().splitlines():
                if line.strip():
                    keys |= json_paths(json.loads(line))
            lines += [f"{path.name}{p}" for p in sorted(keys)]
        else:
            lines.append(f"{path.name}: file")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python scripts/schema_snapshot.py RUN_FOLDER", file=sys.stderr)
        return 2
    print("\n".join(snapshot(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Small file helpers: atomic writes (a crash never leaves half a judgment file) and JSON/JSONL readers whose
errors name the file and line."""

import json
from pathlib import Path
from typing import Any, Iterable

from model.atomic import atomic_write_text as _atomic_write_text
from align.eval.errors import EvalError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via tmp file + fsync + os.replace so readers only ever see the old or the complete new file."""
    return _atomic_write_text(path, text)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_json_list(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvalError(f"{path}: expected a JSON list of objects")
    return data


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".2f") -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which we do not depend on)."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

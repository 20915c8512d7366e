"""Load training rows from a local file, a bundled generator, or the Hugging Face hub, and validate them.

Sources:
  path/to/file.jsonl | .json | .parquet | .csv   a local file (the `split` argument is ignored)
  bundled:NAME[?k=v&k=v]                          a generator in align.data, e.g. `bundled:reasoning?levels=1&n=500`
  org/name                                        a hub dataset (needs network; not available offline)
Bundled names: reasoning, code, chat, helpful_pairs, safety (raw rows) and reasoning_sft, code_sft,
chat_sft, safety_sft, sft_mixture (conversational {messages}); options n, seed, levels=1,2, weights=chat:1,code:2.

Expected columns per stage (rename yours with `columns_map={"their_name": "our_name"}`):
  sft          messages                      list of {role, content}; roles system/user/assistant
  rm           prompt, chosen, rejected      strings (the safety data adds `kind`: harmful|benign)
  grpo (math)  prompt, answer                `answer` is the gold, e.g. a plain number string
  grpo (code)  prompt, tests, entry_point    `tests` is Python source of assert lines

Bad rows (a missing or empty required column, a malformed JSON line) raise `DataError` naming the
file and the line (JSONL) or row (other formats), or with `on_bad_rows="skip"` are dropped and counted.
An empty file, a missing file and a column absent from the whole file are always errors.
"""

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from pydantic import BaseModel, ConfigDict

from align.data.chat import chat_rows
from align.data.code import code_rows
from align.data.mixture import (
    chat_sft_rows,
    code_sft_rows,
    reasoning_sft_rows,
    safety_sft_rows,
    sft_mixture_rows,
)
from align.data.preference import helpful_pair_rows
from align.data.reasoning import reasoning_rows
from align.data.safety import safety_rows
from align.errors import DataError

STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "rm": ("prompt", "chosen", "rejected"),
    "grpo_math": ("prompt", "answer"),
    "grpo_code": ("prompt", "tests", "entry_point"),
}

BUNDLED: dict[str, Callable[..., list[dict]]] = {
    "reasoning": reasoning_rows,
    "code": code_rows,
    "chat": chat_rows,
    "helpful_pairs": helpful_pair_rows,
    "safety": safety_rows,
    "reasoning_sft": reasoning_sft_rows,
    "code_sft": code_sft_rows,
    "chat_sft": chat_sft_rows,
    "safety_sft": safety_sft_rows,
    "sft_mixture": sft_mixture_rows,
}
FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
OnBadRows = Literal["error", "skip"]


class DataSource(BaseModel):
    """One entry of a stage's data list in a recipe."""

    model_config = ConfigDict(extra="forbid")
    source: str
    split: str = "train"
    columns: dict[str, str] = {}
    on_bad_rows: OnBadRows = "error"
    name: str | None = None  # GRPO: the rows' `data_source` column (rewards' `where`); default: see `label`

    @property
    def label(self) -> str:
        """`name`, else the bundled dataset's name (`bundled:safety?n=8` -> safety) or the file's stem."""
        if self.name:
            return self.name
        if self.source.startswith("bundled:"):
            return self.source.removeprefix("bundled:").partition("?")[0]
        return Path(self.source).stem


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _parse_bundled(source: str) -> tuple[str, dict[str, Any]]:
    """`bundled:reasoning?levels=1,2&n=100` -> ("reasoning", {"levels": (1, 2), "n": 100})."""
    name, _, query = source.removeprefix("bundled:").partition("?")
    if name not in BUNDLED:
        raise DataError(f"{source}: unknown bundled dataset {name!r} (known: {', '.join(sorted(BUNDLED))})")
    kwargs: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise DataError(f"{source}: bad option {part!r}, expected key=value")
        if key == "levels":
            kwargs[key] = tuple(int(v) for v in value.split(",") if v)
        elif key == "weights":  # weights=chat:1,reasoning:2
            kwargs[key] = {k: float(w) for k, _, w in (item.partition(":") for item in value.split(","))}
        else:
            kwargs[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, kwargs


def _read_jsonl(path: Path, on_bad_rows: OnBadRows) -> tuple[list[tuple[int, Any]], int]:
    """Parse line by line so an error can name its line (the datasets JSON loader cannot)."""
    rows, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                if on_bad_rows == "error":
                    raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
                skipped += 1
    return rows, skipped


def _read_file(path: Path, on_bad_rows: OnBadRows) -> tuple[list[tuple[int, Any]], int, str, list[str] | None]:
    """Returns ([(position, row)], skipped, position word, file-wide column names or None)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix not in FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_TYPES)})")
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (no rows)")
    if path.suffix == ".jsonl":
        rows, skipped = _read_jsonl(path, on_bad_rows)
        return rows, skipped, "line", None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        return list(enumerate(data, start=1)), 0, "row", None
    try:
        ds = Dataset.from_parquet(str(path)) if path.suffix == ".parquet" else Dataset.from_csv(str(path))
    except Exception as e:  # pyarrow / pandas parse errors
        raise DataError(f"{path}: cannot read {path.suffix[1:]} file ({_first_line(e)})") from None
    return list(enumerate(ds.to_list(), start=1)), 0, "row", list(ds.column_names)


def _bad_value(column: str, value: Any) -> str | None:
    """Why a required column's value is unusable, or None if it is fine."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"empty value in column {column!r}"
    if column == "messages":
        if not isinstance(value, list) or not value:
            return "column 'messages' must be a non-empty list of {role, content}"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"column 'messages': message {i} must have string 'role' and 'content'"
            if m["role"] not in ("system", "user", "assistant"):
                return f"column 'messages': message {i} has unknown role {m['role']!r}"
    return None


def _validate(
    where: str,
    rows: list[tuple[int, Any]],
    pos_word: str,
    required: Iterable[str],
    columns_map: dict[str, str],
    on_bad_rows: OnBadRows,
) -> tuple[list[dict], int]:
    back = {ours: theirs for theirs, ours in columns_map.items()}

    def named(col: str) -> str:
        return f"{back[col]!r} (mapped to {col!r})" if col in back else repr(col)

    good, skipped = [], 0
    for pos, row in rows:
        problem = None
        if not isinstance(row, dict):
            problem = f"expected a JSON object, got {type(row).__name__}"
        else:
            row = {columns_map.get(k, k): v for k, v in row.items()}
            for col in required:
                if col not in row:
                    problem = f"missing column {named(col)}"
                    break
                problem = _bad_value(col, row[col])
                if problem:
                    break
        if problem is None:
            good.append(row)
        elif on_bad_rows == "error":
            raise DataError(f"{where}: {pos_word} {pos}: {problem}")
        else:
            skipped += 1
    return good, skipped


def load_rows(
    source: str,
    split: str = "train",
    columns_map: dict[str, str] | None = None,
    required: Iterable[str] = (),
    on_bad_rows: OnBadRows = "error",
) -> tuple[Dataset, int]:
    """Load, rename and validate rows; returns (dataset, number of skipped bad rows)."""
    if on_bad_rows not in ("error", "skip"):
        raise DataError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    columns_map = dict(columns_map or {})
    required = tuple(required)
    file_columns: list[str] | None = None
    if source.startswith("bundled:"):
        name, kwargs = _parse_bundled(source)
        try:
            data = BUNDLED[name](split=split, **kwargs)
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: {_first_line(e)}") from None
        rows, skipped, pos_word, where = list(enumerate(data, start=1)), 0, "row", source
    elif Path(source).suffix in FILE_TYPES or Path(source).exists():
        path = Path(source)
        rows, skipped, pos_word, file_columns = _read_file(path, on_bad_rows)
        where = str(path)
    else:
        try:
            from datasets import load_dataset

            hub = load_dataset(source, split=split)
        except Exception as e:
            raise DataError(f"{source}: cannot load from the Hugging Face hub ({_first_line(e)})") from None
        rows, skipped, pos_word, where = list(enumerate(hub.to_list(), start=1)), 0, "row", source
        file_columns = list(hub.column_names)

    if not rows and not skipped:
        raise DataError(f"{where}: empty file (no rows)")
    if file_columns is not None:  # a column absent from the whole table is never a per-row problem
        present = {columns_map.get(c, c) for c in file_columns}
        back = {ours: theirs for theirs, ours in columns_map.items()}
        for col in required:
            if col not in present:
                shown = f"{back[col]!r} (mapped to {col!r})" if col in back else repr(col)
                raise DataError(f"{where}: missing column {shown} (found: {', '.join(file_columns)})")
    good, bad = _validate(where, rows, pos_word, required, columns_map, on_bad_rows)
    skipped += bad
    if not good:
        raise DataError(f"{where}: no valid rows ({skipped} skipped)")
    try:
        return Dataset.from_list(good), skipped
    except Exception as e:  # e.g. a column that is a number in one row and text in another
        raise DataError(f"{where}: inconsistent column types ({_first_line(e)})") from None


def load_sources(sources: Iterable[DataSource], required: Iterable[str] = ()) -> tuple[Dataset, int]:
    """Load several sources (same split semantics each) and concatenate them; returns (rows, skipped)."""
    from datasets import concatenate_datasets

    parts, skipped = [], 0
    required = tuple(required)
    for src in sources:
        ds, n = load_rows(src.source, src.split, src.columns, required, src.on_bad_rows)
        parts.append(ds.select_columns([c for c in ds.column_names if c in required] or ds.column_names))
        skipped += n
    if not parts:
        raise DataError("no data sources given")
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), skipped

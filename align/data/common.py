"""Shared helpers for the bundled generators: seeded sampling and a stable train/test split.

Why a hash split: every generated item has a canonical `key` (e.g. "add1:3:5"); the key's hash,
not the seed, decides its split. So the held-out set is disjoint from training for every seed and
every row count, and adding rows never moves an item from one split to the other.
"""

import hashlib
import random
from collections.abc import Callable
from typing import Literal

Split = Literal["train", "test"]
SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 20


def split_of(key: str, test_percent: int = TEST_FRACTION_PERCENT) -> Split:
    """Which split a canonical item key belongs to (about `test_percent`% go to test)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return "test" if h % 100 < test_percent else "train"


def check_split(split: str) -> Split:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split  # type: ignore[return-value]


def rng_for(name: str, split: str, seed: int) -> random.Random:
    """A private RNG per (generator, split, seed): same arguments, same rows."""
    return random.Random(f"{name}:{split}:{seed}")


def sample_rows(
    make: Callable[[random.Random], tuple],
    split: str,
    n: int,
    rng: random.Random,
    unique: bool | None = None,
) -> list[dict]:
    """Draw items with `make(rng) -> (item's split, row[, key])` until `n` rows of `split` are collected.

    Items whose key hashes to the other split are discarded. With `unique` (default: only for the
    test split) repeated items are dropped (by `key` when `make` returns one, else by prompt: so the
    same problem under two wordings counts once), so the held-out set never counts the same item twice;
    if the item space runs out, fewer than `n` rows are returned.
    """
    split = check_split(split)
    unique = (split == "test") if unique is None else unique
    rows: list[dict] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 200 * max(n, 1)
    while len(rows) < n and attempts < max_attempts:
        attempts += 1
        item_split, row, *key = make(rng)
        if item_split != split:
            continue
        ident = key[0] if key else row.get("prompt", repr(row))
        if unique and ident in seen:
            continue
        seen.add(ident)
        rows.append(row)
    return rows

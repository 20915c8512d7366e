"""Token-budget micro-batches (train.micro_batch_tokens): rows packed padding-free into one row each.

    mbs = token_budget_micro_batches(batch, budget=4096)   # each: input_ids [1, n <= budget], no padding

A packed micro-batch holds whole sequences back to back. position_ids restart at 0 for every
sequence and there is no attention_mask, so the network keeps the sequences apart (its causal mask
gets segments from the position ids, network.causal_mask; the MoE's per-sequence terms follow them).
Sequences are taken in order; a new micro-batch starts when the next one would overflow the budget.

Keys of the padded batch [B, T] become (n = packed tokens, S = sequences in the micro-batch):
    [B, T, ...]   per token (input_ids, loss_mask, ...)      -> [1, n, ...]
    [B, T-1, ...] per scored position (ref_logp, old_logp)   -> [1, n-1, ...] (the packed shifted frame)
    routed_experts [B, L, T, k]                              -> [1, L, n, k]
    [B, ...]      per sequence (advantages)                  -> [S, ...]
plus seq_ids / seq_pos [1, n-1] (which sequence and which of its positions each scored position is),
seq_count (S), seq_len (the longest sequence) and seq_rows / seq_cols / seq_lens [S] (each sequence's
row, first column and length in the padded batch). The position that ends a sequence (it would predict
the next sequence's first token) and every sequence's first token are never scored; in a padded row
the first valid token is not scored either unless its loss_mask says so (GRPO's prompts: never).
batching.Forward.per_sequence() turns a packed Forward back into [S, L] rows for per-sequence terms.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .batching import num_rows

PACKED_KEYS = ("seq_ids", "seq_pos", "seq_count", "seq_len")


def valid_spans(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(first column, length) of each row's tokens: its attention_mask's ones, which must be contiguous."""
    ids = np.asarray(batch["input_ids"])
    B, T = ids.shape
    if "attention_mask" not in batch:
        return np.zeros(B, dtype=np.int64), np.full(B, T, dtype=np.int64)
    attn = np.asarray(batch["attention_mask"]).astype(bool)
    lengths = attn.sum(1)
    starts = np.where(lengths > 0, attn.argmax(1), 0)
    cols = np.arange(T)[None, :]
    contiguous = ((cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])) == attn
    if not contiguous.all():
        bad = int(np.flatnonzero(~contiguous.all(1))[0])
        raise ValueError(f"micro_batch_tokens: row {bad}'s attention_mask has holes (packing needs left or right padding)")
    return starts.astype(np.int64), lengths.astype(np.int64)


def budget_groups(lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Consecutive rows whose lengths sum to at most `budget` (every row in one group, in order)."""
    groups, current, used = [], [], 0
    for r, n in enumerate(lengths.tolist()):
        if n > budget:
            raise ValueError(f"engine.train.micro_batch_tokens={budget} is smaller than row {r} ({n} tokens)")
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(r)
        used += n
    return groups + ([current] if current else [])


def pack(batch: dict[str, Any], rows: list[int], starts: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    """These rows of `batch` as one packed micro-batch (see the module docstring)."""
    ids = np.asarray(batch["input_ids"])
    B, T = ids.shape
    lens = lengths[rows]
    n = int(lens.sum())
    seq = np.repeat(np.arange(len(rows)), lens)                                  # [n] sequence of each token
    pos = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)                  # [n] position within it
    src_row, src_col = np.asarray(rows)[seq], starts[rows][seq] + pos              # [n] where it came from
    shifted = pos[:-1] < lens[seq[:-1]] - 1                                        # [n-1] not a sequence's end
    out: dict[str, Any] = {}
    for k, v in batch.items():
        a = v if isinstance(v, np.ndarray) else None
        if k == "attention_mask":
            continue
        if a is not None and k == "routed_experts" and a.ndim == 4 and a.shape[0] == B and a.shape[2] == T:
            out[k] = a[src_row, :, src_col].transpose(1, 0, 2)[None]                # [1, L, n, k]
        elif a is not None and a.ndim >= 2 and a.shape[0] == B and a.shape[1] == T:
            out[k] = a[src_row, src_col][None]                                      # [1, n, ...]
        elif a is not None and a.ndim >= 2 and a.shape[0] == B and a.shape[1] == T - 1:
            x = a[src_row[:-1], np.minimum(src_col[:-1], T - 2)]
            out[k] = np.where(shifted.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0).astype(a.dtype)[None]
        elif a is not None and a.ndim >= 1 and a.shape[0] == B:
            out[k] = a[rows]                                                        # [S, ...]
        else:
            out[k] = v
    if "position_ids" not in batch:
        out["position_ids"] = pos[None].astype(np.int64)
    first = pos == 0                                                               # nothing precedes it
    if "loss_mask" in out:
        out["loss_mask"] = np.where(first[None], 0, out["loss_mask"]).astype(out["loss_mask"].dtype)
    else:                                                                          # loss_mask_of's default
        out["loss_mask"] = (~first[None]).astype(np.float32)
    out["seq_ids"], out["seq_pos"] = seq[:-1][None], pos[:-1][None]
    out["seq_count"], out["seq_len"] = len(rows), int(lens.max())
    out["seq_rows"], out["seq_cols"], out["seq_lens"] = np.asarray(rows), starts[rows], lens
    return out


def token_budget_micro_batches(batch: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """This rank's rows as packed micro-batches of at most `budget` tokens each."""
    if num_rows(batch) == 0:
        return []
    starts, lengths = valid_spans(batch)
    return [pack(batch, g, starts, lengths) for g in budget_groups(lengths, budget)]


def to_rows(packed: np.ndarray, mb: dict[str, Any], T: int) -> np.ndarray:
    """Per-position values of a packed micro-batch [1, n-1] back in its rows' padded layout [S, T-1]
    (0 where nothing is scored); a micro-batch of rows comes back as it is."""
    if "seq_ids" not in mb:
        return packed
    seq, pos = np.asarray(mb["seq_ids"])[0], np.asarray(mb["seq_pos"])[0]
    lens, cols = np.asarray(mb["seq_lens"]), np.asarray(mb["seq_cols"])
    out = np.zeros((int(mb["seq_count"]), T - 1) + packed.shape[2:], dtype=packed.dtype)
    inside = pos < lens[seq] - 1
    out[seq[inside], cols[seq[inside]] + pos[inside]] = packed[0][inside]
    return out


def sequences_in(mb: dict[str, Any]) -> int:
    """Sequences in a micro-batch: its rows, or the sequences packed into it."""
    return int(mb["seq_count"]) if "seq_count" in mb else num_rows(mb)

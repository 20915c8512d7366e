"""Rows of a global batch -> per-rank shards -> micro-batches, and what loss_fn sees for one micro-batch.

Loss contract (this is what makes micro-batching and data parallelism exact): the loss returned for
a micro-batch is that micro-batch's SHARE of the global loss; the engine sums shares over
micro-batches and ranks (gradients are reduced with SUM). Normalise with the global counts the
engine provides, e.g. `fwd.token_mean(per_token_loss)` = sum(loss * mask) / global_num_tokens. Then
N ranks x M micro-batches give the same update as one rank on one big batch. Metrics are plain
micro-batch values (e.g. means over it); the engine averages them over micro-batches and ranks weighted
by rows, so per-sequence means come out exact. The reported "loss" is the sum of shares: the exact loss.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "routed_experts")


@dataclass
class Forward:
    """What loss_fn sees for one micro-batch. logp/entropy/mask are [B, T-1]: position t scores input_ids[:, t+1]."""

    logp: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor
    aux_loss: torch.Tensor
    output: Any
    global_num_tokens: float
    global_num_seqs: int
    seq_ids: torch.Tensor | None = None     # packed micro-batch (packing.py): [1, n-1] sequence of each position
    seq_pos: torch.Tensor | None = None     # [1, n-1] its index within that sequence
    seq_count: int = 0                      # sequences packed
    seq_len: int = 0                        # the longest one

    @property
    def num_seqs(self) -> int:
        """Sequences in this micro-batch (rows, or packed sequences)."""
        return self.seq_count if self.seq_ids is not None else self.logp.shape[0]

    def per_sequence(self, mb: dict[str, torch.Tensor]) -> tuple[Forward, dict[str, torch.Tensor]]:
        """A packed micro-batch as one row per sequence: logp, entropy, mask and every packed per-position
        tensor of `mb` become [S, L] (position j of row s = the sequence's j-th scored position; 0 beyond
        its end, masked), differentiably. Per-sequence terms (seq-mean, GSPO's ratio) then are exact.
        A padded micro-batch comes back as it is."""
        if self.seq_ids is None:
            return self, mb
        shape = self.seq_ids.shape

        def rows(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((self.seq_count, self.seq_len) + tuple(x.shape[2:]))
            return out.index_put((self.seq_ids[0], self.seq_pos[0]), x[0])

        fwd = replace(self, logp=rows(self.logp), entropy=rows(self.entropy), mask=rows(self.mask),
                      seq_ids=None, seq_pos=None)
        mb = {k: rows(v) if isinstance(v, torch.Tensor) and v.shape[:2] == shape and k not in ("seq_ids", "seq_pos")
              else v for k, v in mb.items()}
        return fwd, mb

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of a token-mean over the whole global batch."""
        return (values * self.mask).sum() / max(self.global_num_tokens, 1.0)

    def seq_mean(self, per_seq: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of a mean over all sequences of the global batch."""
        return per_seq.sum() / max(self.global_num_seqs, 1)

    def token_mean_metric(self, values: torch.Tensor) -> float:
        """A metric value that the engine's row-weighted averaging over micro-batches and ranks turns
        into the exact token mean of `values` over the whole global batch."""
        rows = self.num_seqs
        return float((values * self.mask).sum()) / max(self.global_num_tokens, 1.0) * self.global_num_seqs / max(rows, 1)


LossFn = Callable[[Forward, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def num_rows(batch: dict[str, Any]) -> int:
    if "input_ids" not in batch:
        raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
    return int(np.asarray(batch["input_ids"]).shape[0])


def split_rows(batch: dict[str, Any], parts: list[slice]) -> list[dict[str, Any]]:
    """Slice every per-row array; values that are not per-row (scalars, other lengths) are shared."""
    B = num_rows(batch)
    out = []
    for s in parts:
        out.append({k: (v[s] if isinstance(v, np.ndarray | torch.Tensor) and v.ndim and v.shape[0] == B else v)
                    for k, v in batch.items()})
    return out


def even_slices(n: int, parts: int) -> list[slice]:
    """n rows into `parts` contiguous slices whose sizes differ by at most one (like np.array_split)."""
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def loss_mask_of(batch: dict[str, Any]) -> np.ndarray:
    """[B, T-1] float mask of scored positions: loss_mask, else attention_mask, else all ones (shifted)."""
    ids = np.asarray(batch["input_ids"])
    for key in ("loss_mask", "attention_mask"):
        if key in batch:
            return np.asarray(batch[key])[:, 1:].astype(np.float32)
    return np.ones((ids.shape[0], max(ids.shape[1] - 1, 0)), dtype=np.float32)


def micro_batches(batch: dict[str, Any], micro_batch_size: int | None, grad_accum: int | None,
                  rows: int | None = None) -> list[dict[str, Any]]:
    """The optimiser's micro-batching (micro_batch_size or grad_accum), or `rows` per micro-batch."""
    B = num_rows(batch)
    if B == 0:
        return []
    if rows is not None:
        parts = -(-B // rows)
    else:
        parts = grad_accum if grad_accum else (-(-B // micro_batch_size) if micro_batch_size else 1)
    return [mb for mb in split_rows(batch, even_slices(B, min(parts, B))) if num_rows(mb)]


def padding_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """One all-padding row shaped like `batch` (same T): what a rank with fewer micro-batches runs so
    that every sharded rank makes the same collective calls. It scores nothing and counts no load."""
    T = np.asarray(batch["input_ids"]).shape[1]
    return {"input_ids": np.zeros((1, T), dtype=np.int64), "attention_mask": np.zeros((1, T), dtype=np.int64),
            "loss_mask": np.zeros((1, T), dtype=np.float32)}


def to_tensors(mb: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, Any] = {}
    for k, v in mb.items():
        if isinstance(v, np.ndarray):                   # Ray's zero-copy arrays are read-only: copy
            out[k] = torch.from_numpy(np.array(v)).to(device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    out["loss_mask_shifted"] = torch.as_tensor(loss_mask_of(mb)).to(device)
    return out

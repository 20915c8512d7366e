"""Shared by the sharded-training tests: a tiny MoE network (2 layers, 4 experts), batches, a GRPO-shaped
loss, and one torch.multiprocessing spawn of 2 gloo ranks per test module (no Ray)."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import torch

import model

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, intermediate_size=64,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, max_position_embeddings=64)


def tiny_net(weights: bool = True):
    """weights=False (a sharded rank > 0): called under torch.device("meta"), so only the shapes are built."""
    return model.build("tiny", seed=0, **TINY)


def batch(seed: int = 0, rows: int = 5, length: int = 16) -> dict[str, np.ndarray]:
    """Left-padded rows (prompt padding), a per-row weight (an advantage), a scored completion."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY["vocab_size"], size=(rows, length))
    attn = np.ones((rows, length), dtype=np.int64)
    for r in range(rows):
        attn[r, : r % 4] = 0
    ids = np.where(attn == 1, ids, 0)
    loss_mask = attn.copy()
    loss_mask[:, : length // 2] = 0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask.astype(np.float32),
            "weight": rng.normal(size=rows).astype(np.float32), "temperature": 0.9}


def kl_loss(fwd, mb):
    """-A * logp plus a k3 KL to the reference log-probs when the batch carries them (a token-mean share)."""
    loss = fwd.token_mean(-fwd.logp * mb["weight"][:, None])
    if "ref_logp" in mb:
        d = mb["ref_logp"] - fwd.logp
        loss = loss + 0.1 * fwd.token_mean(torch.exp(d) - d - 1)
    return loss, {"seq_logp": float(((fwd.logp.detach() * fwd.mask).sum(1)).mean())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, out: Path, nprocs: int = 2, *args) -> None:
    """Run fn(rank, world_size, port, out, *args) on nprocs gloo ranks; re-raises a rank's failure."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_run, args=(fn, nprocs, free_port(), str(out), args), nprocs=nprocs, join=True)


def _run(rank, fn, world, port, out, args):
    torch.set_num_threads(1)
    fn(rank, world, port, Path(out), *args)


def one_thread():
    """A pytest fixture body: the tiny config runs ~100x faster on 1 thread than on 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

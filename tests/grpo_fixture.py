"""Rewards and a tiny policy checkpoint for the GRPO tests (referenced by dotted path from configs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import model
from model.tokenizer import train_tokenizer


def sevens(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Share of the completion's characters that are '7'."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def brevity(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1 for an empty answer, 0 from 40 characters on: learnable fast (stop with <|eos|> early)."""
    return [1.0 - min(len(c), 40) / 40 for c in completions]


VLLM_CPU_MLA = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=512,
                    qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32)   # what vLLM-CPU's MLA accepts


def make_policy(root: Path, seed: int = 0, **overrides) -> Path:
    """A small MLA/MoE policy with a locally trained tokenizer, saved in the HF layout."""
    texts = [f"{i} plus {j} is {i + j}. Count to {k}: " + " ".join(str(x) for x in range(k))
             for i in range(30) for j in range(10) for k in (3, 7)]
    tok = train_tokenizer(texts, vocab_size=320)
    small = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                 intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2)
    net = model.build("tiny", seed=seed, **{**small, **overrides})
    out = root / "policy"
    net.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_prompts(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Count to {i % 7 + 2}:", "answer": str(i % 7 + 2)}) + "\n")
    return path


def tie_often(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Brevity on prompts "Count to 2:" and "Count to 3:", a constant elsewhere: most groups tie."""
    return [brevity([p], [c])[0] if p.endswith(("2:", "3:")) else 0.5 for p, c in zip(prompts, completions)]


def constant(prompts: list[str], completions: list[str], **columns) -> list[float]:
    return [1.0] * len(completions)


class InProcessEngine:
    """The hybrid engine's driver API on one process: a RolloutWorker (native) and one TrainWorker, no Ray.
    Enough for grpo_step (the loop's step) in fast tests; calls are recorded in `calls`."""

    def __init__(self, policy_dir: Path, cfg, rollout_kwargs: dict | None = None, backend: str = "native"):
        import functools

        from align.grpo.loop import load_policy
        from engine.rollout_worker import RolloutWorker
        from engine.train import TrainWorker

        factory = functools.partial(load_policy, str(policy_dir), cfg.capacity_factor)
        self.rollout = RolloutWorker(backend, str(policy_dir), **(rollout_kwargs or {}))
        self.trainer = TrainWorker(factory, factory if cfg.beta else None, optim=cfg.engine.optim,
                                   train=cfg.engine.train)
        self.calls: list[tuple[str, dict]] = []

    def generate(self, prompts, sampling):
        return self.rollout.generate(prompts, sampling)

    def compute_logprobs(self, batch, which="policy", mode="eval"):
        self.calls.append(("compute_logprobs", {"which": which, "mode": mode, "keys": sorted(batch)}))
        return self.trainer.compute_logprobs(batch, which, mode)

    def train_step(self, batch, loss_fn):
        self.calls.append(("train_step", {"keys": sorted(batch)}))
        return self.trainer.train_step(batch, loss_fn)

    def sync_weights(self):
        self.rollout.load_weights(self.trainer.hf_named_arrays())
        self.rollout.finish_refit(self.trainer.get_generation())
        return None

    def shutdown(self) -> None:
        self.rollout.shutdown()


def fails_on_long(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """Raises unless every completion is empty (on_error=fallback then scores them one by one)."""
    if any(completions):
        raise ValueError("cannot score a non-empty completion")
    return [1.0] * len(completions)


def rollout_batch(rollouts) -> dict[str, np.ndarray]:
    """A training batch of sampled rollouts (prompt + completion, completion tokens scored) with a per-row
    weight from -1 to 1 (a stand-in advantage)."""
    width = max(len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts)
    ids = np.zeros((len(rollouts), width), dtype=np.int64)
    att, lm = np.zeros_like(ids), np.zeros_like(ids)
    for i, r in enumerate(rollouts):
        seq = r.prompt_token_ids + r.token_ids
        ids[i, :len(seq)], att[i, :len(seq)] = seq, 1
        lm[i, len(r.prompt_token_ids):len(seq)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm,
            "weight": np.linspace(-1, 1, len(rollouts)).astype(np.float32)}


"""The GRPO loop: rollout -> reward -> advantages -> train (mu epochs) -> refit, on the hybrid engine.

One step:
  1. take `prompts_per_step` prompts, sample G completions each (rollout phase);
  2. score every reward component and combine them with the stage's weights (reward phase);
  3. A_i = group-relative advantages; optionally drop tied groups (dynamic sampling);
  4. old and reference log-probs recomputed by the trainer on exactly the sampled tokens;
  5. mu optimizer steps on GRPOLoss; 6. refit the rollout weights.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from align.grpo import group_advantages, policy_loss
from align.data.loading import load_rows
from align.grpo_config import GRPOConfig
from engine.sampling import Rollout, SamplingConfig
from rewards.combine import RewardComponent, RewardSet


@dataclass
class GRPOLoss:
    """The loss handed to the engine (picklable: it travels to the training actors)."""

    clip_low: float
    clip_high: float
    beta: float
    agg: str
    max_len: int
    balance_losses: bool

    def __call__(self, fwd, mb: dict) -> tuple[torch.Tensor, dict]:
        ref = mb.get("ref_logp") if self.beta else None
        # mu == 1: the policy that sampled is the one being updated, so pi_old = pi_theta (detached) exactly
        # and its log-probs need no separate forward pass.
        old = mb["old_logp"] if "old_logp" in mb else fwd.logp.detach()
        loss, metrics = policy_loss(fwd.logp, old, ref, mb["advantages"], fwd.mask,
                                    self.clip_low, self.clip_high, self.beta, self.agg, self.max_len,
                                    num_seqs=fwd.global_num_seqs, num_tokens=fwd.global_num_tokens)
        if self.balance_losses:
            loss = loss + fwd.aux_loss * mb["advantages"].shape[0] / max(fwd.global_num_seqs, 1)
        with torch.no_grad():
            m = fwd.mask.bool()
            metrics["entropy"] = float(fwd.entropy[m].mean()) if m.any() else 0.0
        return loss, metrics


def build_batch(rollouts: list[Rollout], advantages: np.ndarray, mask_truncated: bool, pad_id: int,
                replay: bool) -> dict[str, np.ndarray]:
    """Right-padded prompt+completion rows; loss_mask marks completion tokens (aligned with input_ids)."""
    T = max(len(r.prompt_token_ids) + len(r.token_ids) for r in rollouts)
    B = len(rollouts)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    attn = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=np.float32)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_token_ids), len(r.token_ids)
        ids[i, :p + c] = r.prompt_token_ids + r.token_ids
        attn[i, :p + c] = 1
        if not (mask_truncated and r.finish_reason == "length"):
            loss_mask[i, p:p + c] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
             "advantages": advantages.astype(np.float32)}
    if replay and all(r.routed_experts is not None for r in rollouts):
        L, k = len(rollouts[0].routed_experts), rollouts[0].routed_experts[0].shape[-1]
        routed = np.zeros((B, L, T, k), dtype=np.int64)
        for i, r in enumerate(rollouts):
            for layer, idx in enumerate(r.routed_experts):
                routed[i, layer, :idx.shape[0]] = idx
        batch["routed_experts"] = routed
    return batch


class PromptStream:
    """Seeded, resumable pass over the prompts: reshuffled every epoch, position saved in checkpoints."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()


def reward_inputs(rows: list[dict], rollouts: list[Rollout]) -> tuple[list[str], list[str], dict[str, list]]:
    """Prompts, completions and each extra dataset column, one entry per sampled completion."""
    prompts = [rows[r.prompt_index]["prompt"] for r in rollouts]
    completions = [r.text for r in rollouts]
    keys = {k for row in rows for k in row if k not in ("prompt", "messages")}
    columns = {k: [rows[r.prompt_index].get(k) for r in rollouts] for k in sorted(keys)}
    return prompts, completions, columns


def encode_prompts(tokenizer, rows: list[dict], system_prompt: str | None) -> list[list[int]]:
    out = []
    for row in rows:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": row["prompt"]})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def held_out_accuracy(engine, tokenizer, rows: list[dict], scorer, cfg: GRPOConfig) -> float:
    """Greedy completions of held-out prompts scored by one reward function (fraction of full marks)."""
    if not rows:
        return float("nan")
    prompt_ids = encode_prompts(tokenizer, rows, cfg.system_prompt)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=cfg.sampling.max_tokens, seed=cfg.seed)
    rollouts = engine.generate(prompt_ids, greedy)
    prompts, completions, columns = reward_inputs(rows, rollouts)
    scores = scorer(prompts, completions, **columns)
    return float(np.mean([s >= 1.0 for s in scores]))


def grpo_step(engine, tokenizer, cfg: GRPOConfig, rows: list[dict], rewards: RewardSet) -> dict:
    """One full GRPO iteration; returns its metrics."""
    t0 = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, rows, cfg.system_prompt)
    sampling = cfg.sampling.model_copy(update={"n": cfg.group_size})
    rollouts = engine.generate(prompt_ids, sampling)
    rollouts.sort(key=lambda r: r.prompt_index)           # groups are consecutive
    t_rollout = time.perf_counter()

    prompts, completions, columns = reward_inputs(rows, rollouts)
    scored = rewards.score(prompts, completions, **columns)
    total = torch.tensor(scored.total, dtype=torch.float32)
    adv = group_advantages(total, cfg.group_size, cfg.advantage_scale)
    t_reward = time.perf_counter()

    groups = total.view(-1, cfg.group_size)
    tied = (groups.max(1).values - groups.min(1).values) < 1e-8
    keep = torch.ones_like(total, dtype=torch.bool)
    if cfg.dynamic_sampling:
        keep = (~tied).repeat_interleave(cfg.group_size)
    metrics: dict = dict(scored.metrics)                     # rewards/<component>/{mean,std,failures}
    metrics.update({
        "reward/total_mean": float(total.mean()), "reward/total_std": float(total.std()),
        "adv/mean": float(adv.mean()), "adv/std": float(adv.std()), "adv/abs_max": float(adv.abs().max()),
        "groups/zero_variance_share": float(tied.float().mean()),
        "completion/len_mean": float(np.mean([len(r.token_ids) for r in rollouts])),
        "completion/truncated_share": float(np.mean([r.finish_reason == "length" for r in rollouts])),
    })
    train_metrics: dict = {}
    t_train = t_reward
    refit_s = 0.0
    kept = [r for r, k in zip(rollouts, keep.tolist()) if k]
    if kept:
        pad = tokenizer.pad_token_id or 0
        batch = build_batch(kept, adv[keep].numpy(), cfg.mask_truncated, pad, cfg.routing_replay)
        if "routed_experts" in batch:  # expert load over the sampled tokens, per MoE layer
            loads = [np.bincount(np.concatenate([r.routed_experts[layer].ravel() for r in kept]))
                     for layer in range(len(kept[0].routed_experts))]
            metrics["moe/max_over_mean_load"] = float(np.mean([ld.max() / max(ld.mean(), 1e-9) for ld in loads]))
        if cfg.mu > 1:                                       # later updates need the sampling policy's log-probs
            batch["old_logp"] = engine.compute_logprobs(batch, "policy")
        if cfg.beta:
            batch["ref_logp"] = engine.compute_logprobs(batch, "ref")
        loss_fn = GRPOLoss(cfg.clip_low, cfg.clip_high, cfg.beta, cfg.loss_agg, cfg.sampling.max_tokens,
                           cfg.balance_losses)
        for _ in range(cfg.mu):
            train_metrics = engine.train_step(batch, loss_fn)
        t_train = time.perf_counter()
        stats = engine.sync_weights()
        refit_s = float(getattr(stats, "seconds", 0.0))
        metrics["refit/mb_per_s"] = float(getattr(stats, "mb_per_s", 0.0))
    t_end = time.perf_counter()
    metrics.update({f"train/{k}": v for k, v in train_metrics.items()})
    metrics.update({"time/rollout": t_rollout - t0, "time/reward": t_reward - t_rollout,
                    "time/train": t_train - t_reward, "time/refit": refit_s, "time/step": t_end - t0,
                    "tokens/generated": float(sum(len(r.token_ids) for r in rollouts))})
    return metrics


def prune_checkpoints(root: Path, keep_last: int) -> None:
    ckpts = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, default=float)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def load_prompt_rows(sources) -> list[dict]:
    """All rows of all sources, every column kept (math rows carry `answer`, code rows `tests`)."""
    rows: list[dict] = []
    for src in sources:
        ds, _ = load_rows(src.source, src.split, src.columns, ("prompt",), src.on_bad_rows)
        rows.extend(ds.to_list())
    return rows


class MetricsLog:
    """metrics.jsonl (one line per step, fsynced) and TensorBoard; a resumed run truncates later steps."""

    def __init__(self, output_dir: Path, start_step: int, wandb_project: str | None = None, config: dict | None = None):
        self.path = output_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue          # a line cut by a crash
                if rec.get("step", 0) <= start_step:
                    kept.append(line)
        self.path.write_text("".join(x + "\n" for x in kept))
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(str(output_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                from align.errors import UserError
                raise UserError("grpo.wandb_project: the wandb package is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_project, dir=str(output_dir), config=config, resume="allow",
                                    id="deepalign-" + hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16])

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, record["step"])
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_state(engine, root: Path, step: int, stream: PromptStream, rewards: RewardSet, keep_last: int,
               extra: dict) -> Path:
    """A full, resumable checkpoint written to a temporary dir and renamed: complete or absent."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    engine.save(tmp / "engine")
    write_json_atomic(tmp / "trainer_state.json", {"step": step, "stream": stream.state_dict(),
                                                   "rewards": rewards.state_dict(), **extra})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    prune_checkpoints(root, keep_last)
    return final


def host_model_rewards(engine, components: list[RewardComponent]) -> list[RewardComponent]:
    """Model-backed rewards (classes with offload hooks, e.g. reward_model) move into their own engine
    actor, resident only during the reward phase; the component then calls that actor."""
    from rewards.registry import register, resolve

    out = []
    for c in components:
        obj = resolve(c.spec)
        if isinstance(obj, type) and hasattr(obj, "offload"):
            handle = engine.add_scorer(c.label, functools.partial(obj, **c.kwargs))
            name = f"engine-scorer-{c.label}"
            register(name)(handle)
            c = c.model_copy(update={"spec": name, "kwargs": {}, "name": c.label})
        out.append(c)
    return out


def run_grpo(cfg: GRPOConfig, output_dir: Path, resume: bool = False) -> dict:
    """The GRPO stage: returns a summary with the exported HF checkpoint at <output_dir>/model."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import AutoTokenizer

    from align.errors import UserError
    from align.models import save_atomically
    from engine.driver import HybridEngine
    from rewards.registry import resolve

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(cfg.init_from) / "config.json").is_file():
        raise UserError(f"grpo.init_from: {cfg.init_from} is not a checkpoint directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
    rows = load_prompt_rows(cfg.data)
    held_rows = load_prompt_rows(cfg.held_out.data)[: cfg.held_out.max_prompts] if cfg.held_out else []
    held_scorer = resolve(cfg.held_out.reward) if cfg.held_out else None
    stream = PromptStream(rows, cfg.seed)
    engine_cfg = cfg.engine.model_copy(deep=True)
    engine_cfg.train.reference = cfg.beta > 0
    engine_cfg.train.seed = cfg.seed

    ckpt_root = output_dir / "checkpoints"
    start_step, state = 0, {}
    last = latest_checkpoint(ckpt_root) if resume else None
    if resume and last is None and (output_dir / "metrics.jsonl").exists():
        pass  # killed before the first checkpoint: start over
    summary: dict = {}
    with HybridEngine.from_config(engine_cfg, cfg.init_from, output_dir) as engine:
        rewards = RewardSet(host_model_rewards(engine, cfg.rewards))
        if last is not None:
            state = json.loads((last / "trainer_state.json").read_text())
            engine.load(last / "engine")
            engine.sync_weights()
            stream.load_state_dict(state["stream"])
            rewards.load_state_dict(state["rewards"])
            start_step = state["step"]
        log = MetricsLog(output_dir, start_step, cfg.wandb_project, cfg.model_dump(mode="json"))
        acc_start = state.get("held_out_start")
        if acc_start is None and held_rows:
            acc_start = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg)
        columns = [TextColumn("grpo"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("grpo", total=cfg.steps, completed=start_step, info="")
            for step in range(start_step, cfg.steps):
                batch_rows = stream.take(cfg.prompts_per_step)
                step_cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(
                    update={"seed": cfg.seed * 100_003 + step})})
                metrics = grpo_step(engine, tokenizer, step_cfg, batch_rows, rewards)
                metrics["step"] = step + 1
                if cfg.held_out and cfg.held_out.every and (step + 1) % cfg.held_out.every == 0:
                    metrics["held_out/accuracy"] = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg)
                log.write(metrics)
                progress.update(task, advance=1, info=f"reward {metrics['reward/total_mean']:.3f}")
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    save_state(engine, ckpt_root, step + 1, stream, rewards, cfg.keep_last,
                               {"held_out_start": acc_start})
        acc_end = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg) if held_rows else None
        save_state(engine, ckpt_root, cfg.steps, stream, rewards, cfg.keep_last, {"held_out_start": acc_start})

        def export(tmp: Path) -> None:
            engine.export_hf(tmp)
            tokenizer.save_pretrained(tmp)
        save_atomically(export, output_dir / "model")
        log.close()
        summary = {"output_path": str(output_dir / "model"), "held_out_accuracy_start": acc_start,
                   "held_out_accuracy_end": acc_end, "steps": cfg.steps}
    return summary

"""The GRPO loop: rollout -> reward -> advantages -> train (mu epochs) -> refit, on the hybrid engine.

One step:
  1. sample G completions for each of `prompts_per_step` prompts and score every reward component, each
     engine's groups as soon as that engine finishes, combined in prompt order (dynamic sampling refills
     groups whose rewards tie: dynamic_sampling.py);
  2. A_i = group-relative advantages over the kept groups;
  3. the batch: the sampled tokens, the rollout's own log-probs (behavior_logp), its routed experts
     (routing replay, policy only unless routing_replay_ref) and the sampling temperature (the engine
     scores tokens under the tempered distribution they were drawn from);
  4. reference log-probs (the reference routes on its own); with mu > 1, π_old's log-probs in training
     mode (same module mode and token-dropping decisions as the training forward: ratio 1 at first);
  5. mu optimizer steps on GRPOLoss (metrics: mean over the inner steps, and the first and last);
  6. refit the rollout weights.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from align.grpo.batch import build_batch, expert_load_imbalance, without_replay
from align.grpo.async_rollout import async_step, load_inflight
from align.grpo.checkpoint import latest_checkpoint, load_state, save_state
from align.grpo.config import GRPOConfig
from align.grpo.dynamic_sampling import Groups, sample_groups
from align.grpo.loss import GRPOLoss
from align.grpo.metrics import MetricsLog, SamplesLog
from align.grpo.objective import group_advantages
from align.grpo.prompts import PromptStream, encode_prompts, load_prompt_rows, reward_inputs
from align.grpo.reward_hosting import host_model_rewards
from engine.sampling import SamplingConfig
from rewards.combine import RewardSet

log = logging.getLogger(__name__)
TOP_LEVEL = ("mismatch/", "is/")          # loss metrics logged under their own name, not train/


def load_policy(model_dir: str, capacity_factor: float | None, weights: bool = True):
    """The policy (and reference) factory: token dropping as the GRPO config says, capacity per sequence.
    weights=False: on the meta device (a sharded rank > 0 gets its shards from rank 0)."""
    from model import from_pretrained

    net = from_pretrained(model_dir, weights=weights)
    net.set_token_dropping(capacity_factor, per_sequence=True)
    return net


def make_loss(cfg: GRPOConfig) -> GRPOLoss:
    return GRPOLoss(cfg.clip_low, cfg.clip_high, cfg.beta, cfg.loss_agg, cfg.sampling.max_tokens,
                    cfg.balance_losses, cfg.ratio_level, cfg.is_correction, cfg.is_cap, cfg.kl_estimator)


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


def epoch_metrics(per_epoch: list[dict]) -> dict:
    """Inner-epoch train metrics: train/<k> = mean over the mu steps; with mu > 1 also train/first/<k>
    and train/last/<k>. Loss-side mismatch metrics (computed on π_old, the same every epoch) keep their name."""
    out: dict = {}
    for k in per_epoch[0]:
        name = k if k.startswith(TOP_LEVEL) else f"train/{k}"
        out[name] = float(np.mean([m[k] for m in per_epoch]))
        if len(per_epoch) > 1 and not k.startswith(TOP_LEVEL):
            out[f"train/first/{k}"], out[f"train/last/{k}"] = float(per_epoch[0][k]), float(per_epoch[-1][k])
    return out


def grpo_step(engine, tokenizer, cfg: GRPOConfig, stream: PromptStream, rewards: RewardSet,
              samples: SamplesLog | None = None, step: int = 0, groups: Groups | None = None,
              before_refit: Callable[[], None] | None = None) -> dict:
    """One full GRPO iteration; returns its metrics. Async (align/grpo/async_rollout.py): `groups` is the
    batch sampled during the previous step, and before_refit() waits for the next batch's generation,
    which must finish on the old weights, before the refit (stream and rewards are then not touched here)."""
    t0 = time.perf_counter()
    if groups is None:
        groups = sample_groups(engine, tokenizer, cfg, stream, rewards, cfg.sampling.seed)
    t_reward = time.perf_counter()
    G, rollouts = cfg.group_size, groups.rollouts
    total = torch.tensor(groups.totals, dtype=torch.float32)
    metrics: dict = dict(groups.reward_metrics)              # rewards/<component>/{mean,std,failures,...}
    metrics.update({
        "reward/total_mean": float(total.mean()), "reward/total_std": float(total.std()),
        "groups/zero_variance_share": float(np.mean(groups.tied)),
        "groups/kept": float(len(groups.kept)), "groups/all_tied": float(not groups.kept),
        "dynamic/rounds": float(groups.rounds), "dynamic/kept_share": len(groups.kept) / len(groups.tied),
        "completion/len_mean": float(np.mean([len(r.token_ids) for r in rollouts])),
        "completion/truncated_share": float(np.mean([r.finish_reason == "length" for r in rollouts])),
    })
    if samples is not None:
        prompts, completions, _ = reward_inputs(groups.rows, rollouts)
        samples.write(step, prompts, completions, groups.totals, groups.raw, G)
    t_train, refit_s, t_wait = t_reward, 0.0, 0.0
    if not groups.kept:
        log.warning("step %d: every group's rewards tie (%d rounds): no update", step, groups.rounds)
        if before_refit is not None:
            before_refit()
    else:
        kept = groups.kept_rollouts(G)
        adv = group_advantages(torch.tensor(groups.kept_totals(G)), G, cfg.advantage_scale)
        metrics.update({"adv/mean": float(adv.mean()), "adv/std": float(adv.std()),
                        "adv/abs_max": float(adv.abs().max())})
        pad = tokenizer.pad_token_id or 0
        batch = build_batch(kept, adv.numpy(), cfg.mask_truncated, pad, cfg.routing_replay,
                            temperature=cfg.sampling.temperature)
        if all(r.routed_experts is not None for r in kept):   # expert load over the sampled tokens
            metrics["moe/max_over_mean_load"] = expert_load_imbalance(kept)
        if cfg.mu > 1:                                       # later updates need the sampling policy's log-probs
            batch["old_logp"] = engine.compute_logprobs(batch, "policy", mode="train")
        if cfg.beta:
            batch["ref_logp"] = engine.compute_logprobs(batch if cfg.routing_replay_ref else without_replay(batch),
                                                        "ref")
        loss_fn = make_loss(cfg)
        per_epoch = [engine.train_step(batch, loss_fn) for _ in range(cfg.mu)]
        metrics.update(epoch_metrics(per_epoch))
        t_train = time.perf_counter()
        if before_refit is not None:                         # async: the next batch is sampled by these weights
            before_refit()
        t_wait = time.perf_counter() - t_train
        stats = engine.sync_weights()
        refit_s = float(getattr(stats, "seconds", 0.0))
        metrics["refit/mb_per_s"] = float(getattr(stats, "mb_per_s", 0.0))
        metrics["refit/bytes"] = float(getattr(stats, "bytes", 0))       # LoRA: adapters or changed layers only
    t_end = time.perf_counter()
    busy_train = t_train - t_reward + refit_s
    metrics.update({"time/rollout": groups.seconds["rollout"], "time/reward": groups.seconds["reward"],
                    "time/train": t_train - t_reward, "time/wait_rollout": t_wait,
                    "time/refit": refit_s, "time/step": t_end - t0,
                    "time/train_idle_share": max(0.0, 1 - busy_train / max(t_end - t0, 1e-9)),
                    "time/rollout_idle_share": max(0.0, 1 - groups.seconds["rollout"] / max(t_end - t0, 1e-9)),
                    "tokens/generated": float(sum(len(r.token_ids) for r in rollouts))})
    return metrics


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
    last = latest_checkpoint(ckpt_root) if resume else None      # none yet: start over
    factory = functools.partial(load_policy, str(cfg.init_from), cfg.capacity_factor)
    summary: dict = {}
    with HybridEngine.from_config(engine_cfg, cfg.init_from, output_dir, model_factory=factory) as engine:
        rewards = RewardSet(host_model_rewards(engine, cfg.rewards))
        if last is not None:
            state = load_state(engine, last, stream, rewards)
            start_step = state["step"]
        inflight = load_inflight(last) if last is not None and cfg.async_rollout.enabled else None
        log_ = MetricsLog(output_dir, start_step, cfg.wandb_project, cfg.model_dump(mode="json"))
        samples = SamplesLog(output_dir, start_step, cfg.log_samples)
        acc_start = state.get("held_out_start")
        if acc_start is None and held_rows:
            acc_start = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg)
        columns = [TextColumn("grpo"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("grpo", total=cfg.steps, completed=start_step, info="")
            def step_cfg_of(step: int) -> GRPOConfig:
                return cfg.model_copy(update={"sampling": cfg.sampling.model_copy(
                    update={"seed": cfg.seed * 100_003 + step})})

            for step in range(start_step, cfg.steps):
                if cfg.async_rollout.enabled:                 # one-step off-policy (async_rollout.py)
                    metrics, inflight = async_step(engine, tokenizer, cfg, step_cfg_of, stream, rewards, samples,
                                                   step, inflight, grpo_step)
                else:
                    metrics = grpo_step(engine, tokenizer, step_cfg_of(step), stream, rewards, samples, step + 1)
                metrics["step"] = step + 1
                if cfg.held_out and cfg.held_out.every and (step + 1) % cfg.held_out.every == 0:
                    metrics["held_out/accuracy"] = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg)
                log_.write(metrics)
                progress.update(task, advance=1, info=f"reward {metrics['reward/total_mean']:.3f}")
                if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    save_state(engine, ckpt_root, step + 1, stream, rewards, cfg.keep_last,
                               {"held_out_start": acc_start}, inflight)
        acc_end = held_out_accuracy(engine, tokenizer, held_rows, held_scorer, cfg) if held_rows else None
        save_state(engine, ckpt_root, cfg.steps, stream, rewards, cfg.keep_last, {"held_out_start": acc_start})

        def export(tmp: Path) -> None:
            engine.export_hf(tmp)
            tokenizer.save_pretrained(tmp)
        save_atomically(export, output_dir / "model")
        log_.close()
        summary = {"output_path": str(output_dir / "model"), "held_out_accuracy_start": acc_start,
                   "held_out_accuracy_end": acc_end, "steps": cfg.steps}
    return summary

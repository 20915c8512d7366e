"""Checkpoint and resume: full training state in step-N dirs, written to a temp dir and renamed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from model.atomic import atomic_write_text, commit_dir, staging_dir


def prune_checkpoints(root: Path, keep_last: int) -> None:
    ckpts = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, default=float))


def save_state(engine, root: Path, step: int, stream, rewards, keep_last: int, extra: dict,
               inflight=None) -> Path:
    """A full, resumable checkpoint (engine state, prompt stream, reward statistics and, in async GRPO, the
    batch already sampled for the next step): complete or absent."""
    from align.grpo.async_rollout import save_inflight

    final = root / f"step-{step}"
    tmp = staging_dir(final, "save")   # a fixed name: every training rank writes its shards into it
    engine.save(tmp / "engine")
    save_inflight(tmp, inflight)
    write_json_atomic(tmp / "trainer_state.json", {"step": step, "stream": stream.state_dict(),
                                                   "rewards": rewards.state_dict(), **extra})
    commit_dir(tmp, final)
    prune_checkpoints(root, keep_last)
    return final


def load_state(engine, ckpt: Path, stream, rewards) -> dict:
    """Restore what save_state wrote; returns the trainer state (its "step" is where to continue)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    engine.load(ckpt / "engine")
    engine.sync_weights()
    stream.load_state_dict(state["stream"])
    rewards.load_state_dict(state["rewards"])
    return state

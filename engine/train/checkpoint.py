"""Training checkpoints: model, optimizer, scheduler, step and every rank's RNG; complete or absent.

Two layouts, chosen by `train.sharding` when saving and detected when loading:
- replicated (sharding=none): rank 0 writes model.safetensors + optimizer.pt (every rank holds the same);
- sharded (sharding=fsdp2): every rank writes its shards with torch.distributed.checkpoint into dcp/;
  loading it at another rank count (or unsharded, at 1 rank) reshards: DCP plans reads by tensor name.
trainable_only (LoRA): only the parameters that train (the adapters) and their AdamW state are saved
(adapter.safetensors, or DCP with frozen parameters left out); the frozen base comes from init_from.
Both add scheduler.pt, rng.pt (a list: one state per rank) and trainer_state.json, written by rank 0.
The directory is staged under a fixed sibling name (every rank must find it) and renamed in whole.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.atomic import commit_dir, staging_dir


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()


def _dcp_state(model, optimizer, trainable_only: bool = False) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=trainable_only)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, optimizer, options=options)}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save(path: Path, *, rank: int, distributed: bool, sharded: bool, model, optimizer, scheduler, step: int,
         rngs: list[dict[str, Any]], trainable_only: bool = False) -> None:
    """Every rank calls this when sharded; only rank 0 when replicated."""
    from safetensors.torch import save_model

    tmp = Path(path).parent / f".{Path(path).name}.tmp-shared"
    if rank == 0:
        tmp = staging_dir(path, "shared")
    _barrier(distributed and sharded)
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(model, optimizer, trainable_only), checkpoint_id=str(tmp / "dcp"))
        if rank == 0:
            if not sharded and trainable_only:
                from safetensors.torch import save_file

                save_file(_trainable(model), str(tmp / "adapter.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            elif not sharded:
                save_model(model, str(tmp / "model.safetensors"))
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": step, "world_size": len(rngs), "format": "dcp" if sharded else "replicated"}))
        _barrier(distributed and sharded)                 # every shard is on disk before rank 0 renames
        if rank == 0:
            commit_dir(tmp, path)
    finally:
        if rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
    _barrier(distributed and sharded)


def load(path: Path, *, model, optimizer, scheduler, device, sharded: bool,
         trainable_only: bool = False) -> tuple[int, list[dict[str, Any]]]:
    """Restore into this rank (every rank calls it; the path must be visible to all). -> (step, rngs)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"{path}: not a checkpoint written by TrainWorker.save (no trainer_state.json)")
    if (path / "dcp").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        from torch.distributed.checkpoint.state_dict import StateDictOptions

        state = _dcp_state(model, optimizer, trainable_only)
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
        set_model_state_dict(model, state["model"], options=options)
        set_optimizer_state_dict(model, optimizer, state["optim"], options=options)
    elif sharded:
        raise ValueError(f"{path}: a sharding=none checkpoint; resume it with train.sharding=none")
    elif trainable_only != (path / "adapter.safetensors").exists():
        raise ValueError(f"{path}: a {'full' if trainable_only else 'LoRA'} checkpoint; resume it with "
                         f"train.lora {'set' if trainable_only else 'unset'} as it was saved")
    elif trainable_only:
        from safetensors.torch import load_file

        saved = load_file(str(path / "adapter.safetensors"), device=str(device))
        if set(saved) != set(_trainable(model)):
            raise ValueError(f"{path}: its adapters do not match train.lora (different targets or rank)")
        model.load_state_dict(saved, strict=False)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    else:
        load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    step = int(json.loads((path / "trainer_state.json").read_text())["step"])
    return step, torch.load(path / "rng.pt", weights_only=False)

"""One training rank: policy (+ frozen reference), AdamW, LR schedule, micro-batching, sharding.

The worker knows no RL maths. `train_step(batch, loss_fn)` runs the policy forward per micro-batch,
hands `loss_fn` a `Forward` (per-token log-probs of the shifted input_ids, entropies, MoE aux loss)
and back-propagates what it returns (see batching.py for the loss contract).

train.sharding: `none` = every rank holds the full model, gradients are all-reduced (data parallel);
`fsdp2` = parameters, gradients and AdamW state are sharded (sharding.py), weights are gathered only
for refit and export. Under fsdp2 every call that touches weights (train_step, compute_logprobs,
weight_buckets / refit_peer, save, load, export_hf) must run on every rank, in the same order.

Batch keys (numpy, rows = sequences): input_ids [B, T] (required); attention_mask [B, T]; loss_mask
[B, T] (1 where input token t is scored, i.e. predicted from t-1; aligned with input_ids);
position_ids and routed_experts (passed to the model); temperature (a scalar: the sampling
temperature, logits are divided by it, policy and reference alike; absent, 0 or 1 = raw logits;
top-k / top-p truncation is not applied); anything else is passed through to loss_fn.
Our network computes log-probs and entropy chunk by chunk from its hidden states (model.logprobs);
another model (e.g. transformers') goes through its logits.
Plain class so tests can run it in-process; the driver wraps it with ray.remote.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import nullcontext
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.atomic import atomic_dir

from ..config import OptimConfig, TrainConfig
from ..logprobs import entropy as token_entropy
from ..logprobs import token_logprobs
from ..offload import Mode, Offloader, OffloadedError
from . import checkpoint, expert_parallel, grads, lora, sharding
from .batching import MODEL_INPUTS, Forward, LossFn, loss_mask_of, micro_batches, num_rows, padding_batch, to_tensors
from .packing import sequences_in, to_rows, token_budget_micro_batches
from .numerics import accelerator_for, enable_gradient_checkpointing, resolve_precision, scores_in_forward
from .rng import rng_state, seed_all, set_rng_state

log = logging.getLogger(__name__)

ModelFactory = Callable[[], nn.Module]


class TrainWorker:
    """A training rank. world_size > 1 or sharding=fsdp2 needs init_distributed() (the driver does it) first."""

    def __init__(self, model_factory: ModelFactory, ref_factory: ModelFactory | None = None,
                 optim: OptimConfig | None = None, train: TrainConfig | None = None, rank: int = 0,
                 world_size: int = 1, offload_mode: Mode = "accounting"):
        self.optim_cfg = optim or OptimConfig()
        self.train_cfg = t = train or TrainConfig()
        self.rank, self.world_size = rank, world_size
        self.sharded = t.sharding == "fsdp2"
        if t.micro_batch_tokens and (self.optim_cfg.micro_batch_size or self.optim_cfg.grad_accum):
            raise ValueError("set at most one of train.micro_batch_tokens, optim.micro_batch_size, optim.grad_accum")
        self.precision = resolve_precision(t.mixed_precision)
        if self.sharded and self.precision == "fp16":
            raise ValueError("train.sharding=fsdp2 supports mixed_precision bf16 or no, not fp16")
        self.accelerator = accelerator_for("no" if self.sharded else self.precision)   # fsdp2: MixedPrecisionPolicy
        self.device = self.accelerator.device
        torch.manual_seed(t.seed)                            # identical init on every rank (rank 0 broadcasts too)
        # fsdp2: ranks > 0 build the architecture on the meta device and receive their shards from rank 0
        # (init_distributed), so a node holds one full copy at most (V2 in fp32: 944 GB), not one per rank.
        self.on_meta = self.sharded and rank > 0 and t.lora is None
        self.model: nn.Module = sharding.build(model_factory, self.on_meta, self.device)
        self.model.train()
        if t.lora is not None:                               # adapters only; the frozen base is the reference
            lora.attach(self.model, t.lora)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.ref: nn.Module | None = None
        self.ref_is_base = ref_factory is not None and t.lora is not None    # no reference copy loaded
        if ref_factory is not None and not self.ref_is_base:
            torch.manual_seed(t.seed)
            self.ref = sharding.build(ref_factory, self.on_meta, self.device).eval().requires_grad_(False)
        if self.sharded and offload_mode == "real":
            log.warning("offload mode 'real' is not implemented for sharding=fsdp2 (use train.cpu_offload): accounting")
            offload_mode = "accounting"
        self.offload_mode = offload_mode
        self.optimizer = self.scheduler = self.raw_optimizer = None
        if not self.sharded:
            self._build_optimizer()
        self.step = 0                                       # optimizer steps taken = policy weight version
        seed_all(t.seed + self.rank)

    # -- setup ---------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        from transformers import get_scheduler

        o = self.optim_cfg
        params = [p for p in self.model.parameters() if p.requires_grad]     # LoRA: the adapters
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay, fused=o.fused)
        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[o.schedule]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=o.total_steps)
        self.raw_optimizer = optimizer
        if self.sharded:
            self.optimizer, self.scheduler = optimizer, scheduler
        else:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        self.offloader = Offloader(self.offload_mode)
        self.offloader.add_module("policy", self.unwrapped)
        self.offloader.add_optimizer("optimizer", optimizer)
        if self.ref is not None:
            self.offloader.add_module("ref", self.ref)

    @property
    def unwrapped(self) -> nn.Module:
        return self.model if self.sharded else self.accelerator.unwrap_model(self.model)

    def master_address(self) -> tuple[str, int]:
        """Rank 0 picks the rendezvous address: this node's IP and a free port."""
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_distributed(self, addr: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the process group (gloo on CPU, NCCL on GPU), take rank 0's weights, shard if fsdp2."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if addr.startswith("127."):                         # all ranks on this host: keep gloo on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if not dist.is_initialized():                       # (in-process tests may share one group)
            dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                    world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        models = [self.unwrapped] + ([self.ref] if self.ref is not None else [])
        if not self.sharded:                                # replicated: every rank takes rank 0's weights
            with torch.no_grad():
                for m in models:
                    for x in list(m.parameters()) + list(m.buffers()):
                        dist.broadcast(x.data, src=0)
        if self.sharded:                                    # shard first (on meta too), then scatter rank 0's
            full = [dict(m.state_dict()) if self.rank == 0 else {} for m in models]
            t = self.train_cfg
            mesh, expert_mesh = sharding.device_mesh(self.world_size, t.replicas, self.device.type), None
            if t.ep_size > 1:                               # experts split over EP groups (expert_parallel.py)
                meshes = expert_parallel.mesh(self.world_size, t.ep_size, self.device.type)
                mesh, expert_mesh = meshes.world, meshes.edp
                for m in [self.unwrapped] + ([self.ref] if self.ref is not None else []):
                    expert_parallel.distribute_experts(m, meshes)
            sharding.shard(self.model, mesh, self.precision, t.cpu_offload, expert_mesh=expert_mesh)
            if self.ref is not None:
                sharding.shard(self.ref, mesh, self.precision, t.cpu_offload, expert_mesh=expert_mesh)
            for m, state in zip(models, full):
                sharding.load_from_rank0(m, state, self.device)
            del full
            self._build_optimizer()

    def ready(self) -> dict[str, Any]:
        """Where this rank runs (node id, pid, device); also a cheap liveness probe."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"rank": self.rank, "node_id": node, "pid": os.getpid(), "device": str(self.device)}

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        if not (dist.is_available() and dist.is_initialized()) or self.world_size == 1:
            return values
        x = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(x, op=op)
        return x.tolist()

    def _require(self, *names: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(f"rank {self.rank}: sharding=fsdp2 needs init_distributed() before use")
        for n in names:
            slot = self.offloader.slots.get(n)
            if slot is not None and not slot.resident:
                raise OffloadedError(f"rank {self.rank}: '{n}' is offloaded; enter a phase that declares it first")

    # -- forward -------------------------------------------------------------------------------
    def _micro_batches(self, batch: dict[str, Any], rows: int | None = None, pad: bool = True) -> list[dict[str, Any]]:
        """This rank's micro-batches (train.micro_batch_tokens: packed, packing.py, unless `rows` is asked);
        sharded ranks pad with all-padding rows to the same count (collectives)."""
        o = self.optim_cfg
        if self.train_cfg.micro_batch_tokens and rows is None:
            mbs = token_budget_micro_batches(batch, self.train_cfg.micro_batch_tokens)
        else:
            mbs = micro_batches(batch, o.micro_batch_size, o.grad_accum, rows)
        return self._pad_micro_batches(batch, mbs) if pad else mbs

    def _pad_micro_batches(self, batch: dict[str, Any], mbs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.sharded and self.world_size > 1:
            most = int(self._all_reduce([float(len(mbs))], dist.ReduceOp.MAX)[0])
            mbs = mbs + [padding_batch(batch)] * (most - len(mbs))
        return mbs

    def _forward(self, model: nn.Module, t: dict[str, torch.Tensor], grad_entropy: bool,
                 counts: tuple[float, int]) -> Forward:
        kwargs = {k: t[k] for k in MODEL_INPUTS if k in t}
        temperature = float(t["temperature"]) if "temperature" in t else 1.0
        temperature = temperature if temperature > 0 else 1.0
        labels = t["input_ids"][:, 1:]
        chunk = self.train_cfg.logprob_chunk_tokens
        inner = model if self.sharded else self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            if scores_in_forward(inner):                   # no [B, T, V] logits, forward or backward
                out = model(**kwargs, logprob_labels=labels, logprob_chunk_tokens=chunk, temperature=temperature)
                logp, ent = out.token_logprobs, out.token_entropy
                if not (grad_entropy and torch.is_grad_enabled()):
                    ent = ent.detach()
            else:
                out = model(**kwargs)
        if not scores_in_forward(inner):
            logits = (out.logits if hasattr(out, "logits") else out[0])[:, :-1]
            if temperature != 1.0:                          # score under the sampling distribution
                logits = logits / temperature
            logp = token_logprobs(logits, labels, chunk)
            with torch.set_grad_enabled(grad_entropy and torch.is_grad_enabled()):
                ent = token_entropy(logits, chunk)
        aux = getattr(out, "aux_loss", None)
        aux = aux if isinstance(aux, torch.Tensor) else torch.zeros((), device=logp.device)
        return Forward(logp=logp, entropy=ent, mask=t["loss_mask_shifted"], aux_loss=aux, output=out,
                       global_num_tokens=counts[0], global_num_seqs=counts[1], seq_ids=t.get("seq_ids"),
                       seq_pos=t.get("seq_pos"), seq_count=int(t.get("seq_count", 0)), seq_len=int(t.get("seq_len", 0)))

    def _global_counts(self, batch: dict[str, Any], mbs: list[dict[str, Any]] | None = None) -> tuple[float, int]:
        """(scored tokens, sequences) over all ranks; packed micro-batches count what they score."""
        scored = sum(float(loss_mask_of(mb).sum()) for mb in mbs) if self.train_cfg.micro_batch_tokens and mbs is not None \
            else float(loss_mask_of(batch).sum())
        tokens, seqs = self._all_reduce([scored, float(num_rows(batch))])
        return tokens, int(round(seqs))

    # -- training ------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's shard; returns metrics reduced over all ranks (identical on each)."""
        self._require("policy", "optimizer")
        own = self._micro_batches(batch, pad=False)
        counts = self._global_counts(batch, own)
        real = len(own)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        loss_sum = 0.0
        for i, mb in enumerate(self._pad_micro_batches(batch, own)):
            t = to_tensors(mb, self.device)
            fwd = self._forward(self.model, t, self.train_cfg.entropy_grad, counts)
            if i >= real:                                   # padding: zero gradients, same collectives
                self.accelerator.backward(fwd.logp.sum() * 0.0)
                continue
            loss, metrics = loss_fn(fwd, t)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(f"loss_fn must return (scalar tensor, metrics dict), got {type(loss).__name__}")
            self.accelerator.backward(loss)
            loss_sum += float(loss.detach())
            w = sequences_in(mb) / max(counts[1], 1)          # metrics: row-weighted mean over the batch
            for k, v in metrics.items():
                sums[k] += w * float(v)
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        for p in params:                                    # unused experts: zero grads on every rank alike
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if not self.sharded and self._distributed:
            grads.all_reduce_(params)                       # fsdp2 reduce-scattered them in the backward
        grad_norm = self._clip(params)
        lr = float(self.scheduler.get_last_lr()[0])
        skipped = not np.isfinite(grad_norm)
        if self.accelerator.scaler is not None:             # fp16: the scaler skips and lowers its scale itself
            self.optimizer.step()
            skipped = bool(self.optimizer.step_was_skipped)
            self.scheduler.step()                           # accelerate's wrapper holds still on a skipped step
        elif not skipped:                                   # non-finite grads: no update, schedule holds still
            self.optimizer.step()
            self.scheduler.step()
        self._grad_bytes = sharding.nbytes(p.grad for p in params)    # held until here (reported by held_bytes)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 0 if skipped else 1
        reduced = self._reduce_metrics({"loss": loss_sum, **sums})
        return {**reduced, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped),
                "num_tokens": counts[0], "num_seqs": float(counts[1]), "step": float(self.step)}

    def _clip(self, params: list[nn.Parameter]) -> float:
        """The global gradient norm before clipping to optim.max_grad_norm (grads.clip_, in this layout)."""
        return grads.clip_(params, self.optim_cfg.max_grad_norm, self.accelerator, self.sharded, self.train_cfg.ep_size)

    def _reduce_metrics(self, local: dict[str, float]) -> dict[str, float]:
        if not self._distributed:
            return dict(local)
        gathered: list[dict[str, float]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, dict(local))
        total: dict[str, float] = defaultdict(float)
        for d in gathered:
            for k, v in d.items():
                total[k] += v
        return dict(total)

    @torch.no_grad()
    def compute_logprobs(self, batch: dict[str, Any], which: str = "policy", mode: str = "eval") -> np.ndarray:
        """Per-token log-probs [B, T-1] (float32) of the shifted input_ids under the policy or reference model.

        mode="train" runs the module in training mode (token dropping as in train_step), so that the
        log-probs equal what the next train_step's forward computes; the reference is always in eval
        mode. Micro-batches: train.logprob_micro_batch_size rows, else the optimiser's micro-batching."""
        if mode not in ("eval", "train"):
            raise ValueError(f"compute_logprobs: mode must be 'eval' or 'train', got {mode!r}")
        if which not in ("policy", "ref"):
            raise ValueError(f"compute_logprobs: which must be 'policy' or 'ref', got {which!r}")
        if which == "ref" and self.ref is None and not self.ref_is_base:
            raise ValueError("compute_logprobs(which='ref') but the engine has no reference model (train.reference)")
        base = which == "ref" and self.ref_is_base                  # LoRA: the policy with adapters disabled
        self._require("policy" if base else which)
        model = self.model if which == "policy" or base else self.ref
        model.train(mode == "train" and which == "policy")
        B, T = np.asarray(batch["input_ids"]).shape[:2]
        out = [np.zeros((0, max(T - 1, 0)), dtype=np.float32)]
        with lora.adapters_disabled(self.unwrapped) if base else nullcontext():
            for mb in self._micro_batches(batch, self.train_cfg.logprob_micro_batch_size):
                fwd = self._forward(model, to_tensors(mb, self.device), False, (0.0, 0))
                out.append(to_rows(fwd.logp.float().cpu().numpy(), mb, T))
        return np.concatenate(out)[:B]

    # -- weights for refit, checkpoints ----------------------------------------------------------
    def _full_named_tensors(self, payload: str = "full") -> Iterator[tuple[str, torch.Tensor]]:
        """(checkpoint name, full tensor): under fsdp2 one all-gather per tensor, on every rank in the same order.
        LoRA: payload full / merged / adapter (engine/train/lora.py refit_payload); without: full only."""
        from ..refit import hf_named_tensors

        if self.train_cfg.lora is not None:
            yield from lora.refit_payload(self.unwrapped, payload, sharding.full_tensor)
            return
        if payload != "full":
            raise ValueError(f"refit payload {payload!r} needs train.lora (a full model sends everything)")
        for name, x in self.unwrapped.state_dict().items():
            yield from hf_named_tensors({name: sharding.full_tensor(x)})

    def hf_named_arrays(self) -> list[tuple[str, np.ndarray]]:
        """Checkpoint-named float32 numpy weights (per-expert names), for in-process refit."""
        from ..refit import to_float32_numpy

        self._require("policy")
        with torch.no_grad():
            return [(n, to_float32_numpy(x).copy()) for n, x in self._full_named_tensors()]

    def weight_buckets(self, bucket_bytes: int, payload: str = "full") -> Iterator[list[tuple[str, np.ndarray]]]:
        """Yields buckets of (checkpoint name, float32 array); the driver calls it as a Ray streaming generator
        on rank 0, and refit_peer on the other ranks when sharded."""
        from ..refit import buckets

        self._require("policy")
        with torch.no_grad():
            yield from buckets(self._full_named_tensors(payload), bucket_bytes)

    def refit_peer(self, payload: str = "full") -> None:
        """A non-zero rank's part of a sharded refit: the same all-gathers as rank 0, results dropped."""
        self._require("policy")
        with torch.no_grad():
            for _ in self._full_named_tensors(payload):
                pass

    def sync_send(self, transport: str, bucket_bytes: int, dtype: str | None = None, with_checksum: bool = False,
                  nccl: dict[str, Any] | None = None, payload: str = "full") -> Iterator[Any]:
        """Weight sync, sending side (engine/weight_sync): packed buckets in `dtype` (None = as trained), as
        meta then numpy bytes per bucket for the object store, meta then a CUDA IPC handle for cuda_ipc, meta only for nccl
        (the bytes follow by broadcast; nccl = NcclGroup kwargs). A Ray streaming generator."""
        from .. import weight_sync as ws
        from ..weight_sync import cuda_ipc, object_store
        from ..weight_sync.nccl import NcclGroup

        self._require("policy")
        torch_dtype = None if dtype is None else ws.base.DTYPES[dtype]
        with torch.no_grad():
            named = self._full_named_tensors(payload)
            if transport == "object_store":
                yield from object_store.send(named, bucket_bytes, torch_dtype, with_checksum)
            elif transport == "cuda_ipc":
                self._ipc = cuda_ipc.IpcSender()
                yield from self._ipc.send(named, bucket_bytes, torch_dtype, with_checksum, self.device)
            elif transport == "nccl":
                if getattr(self, "_nccl", None) is None:
                    self._nccl = NcclGroup(**nccl, rank=0, device=self.device)
                yield from self._nccl.send(named, bucket_bytes, torch_dtype, with_checksum)
            else:
                raise ValueError(f"unknown weight-sync transport {transport!r}")

    def sync_release(self) -> None:
        """After the driver saw every bucket loaded: free the CUDA IPC buffers kept alive for the engine."""
        ipc = getattr(self, "_ipc", None)
        if ipc is not None:
            ipc.release()
            self._ipc = None

    def held_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, optimizer state (local shards) and the gradients of the last step."""
        return {**sharding.held_bytes(self.unwrapped, self.raw_optimizer), "grads": getattr(self, "_grad_bytes", 0)}

    def offload(self, names: list[str]) -> None:
        self.offloader.offload(names)

    def reload(self, names: list[str]) -> None:
        self.offloader.reload(names)

    def offload_sizes(self) -> dict[str, int]:
        return self.offloader.sizes() if self.optimizer is not None else {}

    def get_generation(self) -> int:
        """Policy weight version = optimizer steps taken (saved and restored with checkpoints)."""
        return self.step

    def rng_state(self) -> dict[str, Any]:
        return rng_state()

    def save(self, path: str | os.PathLike, rng_states: list[dict[str, Any]] | None = None) -> None:
        """Replicated: rank 0 writes everything. Sharded: every rank writes its shards (call it on all)."""
        self._require("policy", "optimizer")
        checkpoint.save(Path(path), rank=self.rank, distributed=self._distributed, sharded=self.sharded,
                        model=self.unwrapped, optimizer=self.raw_optimizer if self.sharded else self.optimizer,
                        scheduler=self.scheduler, step=self.step, trainable_only=self.train_cfg.lora is not None,
                        rngs=rng_states if rng_states is not None else [rng_state()])

    def load(self, path: str | os.PathLike) -> int:
        """Restore what save() wrote, at any rank count for a sharded checkpoint (every rank reads it)."""
        self._require("policy", "optimizer")
        self.step, rngs = checkpoint.load(Path(path), model=self.unwrapped, optimizer=self.raw_optimizer,
                                          scheduler=self.scheduler, device=self.device, sharded=self.sharded,
                                          trainable_only=self.train_cfg.lora is not None)
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            log.warning("checkpoint %s has RNG states for %d ranks, running %d: reseeding", path, len(rngs),
                        self.world_size)
            seed_all(self.train_cfg.seed + self.rank)
        return self.step

    def export_hf(self, path: str | os.PathLike) -> None:
        """The policy as an HF checkpoint directory (rank 0 writes; sharded: every rank joins the gather)."""
        self._require("policy")
        if self.train_cfg.lora is not None:                 # merged HF checkpoint + the peft adapter in adapter/
            return lora.export(self.unwrapped, self.train_cfg.lora, Path(path), self.rank, sharding.full_tensor,
                               self._distributed)
        if not self.sharded:
            if self.rank == 0:
                atomic_dir(Path(path), lambda tmp: self.unwrapped.save_pretrained(tmp))
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            atomic_dir(Path(path), lambda tmp: self.unwrapped.save_pretrained(tmp, state_dict=full))
        if self._distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

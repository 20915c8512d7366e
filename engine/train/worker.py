"""One data-parallel training rank: policy (+ frozen reference), AdamW, LR schedule, micro-batching.

The worker knows no RL maths. `train_step(batch, loss_fn)` runs the policy forward per micro-batch,
hands `loss_fn` a `Forward` (per-token log-probs of the shifted input_ids, entropies, MoE aux loss)
and back-propagates what it returns.

Loss contract (this is what makes micro-batching and data parallelism exact): the loss returned for
a micro-batch is that micro-batch's SHARE of the global loss; the engine sums shares over
micro-batches and ranks (gradients are all-reduced with SUM). Normalise with the global counts the
engine provides, e.g. `fwd.token_mean(per_token_loss)` = sum(loss * mask) / global_num_tokens. Then
N ranks x M micro-batches give the same update as one rank on one big batch. Metrics are plain
micro-batch values (e.g. means over it); the engine averages them over micro-batches and ranks weighted
by rows, so per-sequence means come out exact. The reported "loss" is the sum of shares: the exact loss.

Batch keys (numpy, rows = sequences): input_ids [B, T] (required); attention_mask [B, T]; loss_mask
[B, T] (1 where input token t is scored, i.e. predicted from t-1; aligned with input_ids);
position_ids and routed_experts (passed to the model); temperature (a scalar: the sampling
temperature, see below); anything else is passed through to loss_fn.

Temperature: tokens sampled at temperature τ came from softmax(z / τ), so the forward scores them
under that distribution: logits are divided by the batch's `temperature` (policy and reference
alike; absent, 0 (greedy) or 1 = raw logits). This is a property of the sampling distribution, not
RL maths. Top-k / top-p truncation is not applied: the trainer's π(o_t) is the tempered, untruncated
probability, so for a sampled token it is the sampler's truncated probability times the kept mass
(<= 1). A loss that compares against the sampler's own log-probs sees that as a mismatch.
Plain class so tests can run it in-process; the driver wraps it with ray.remote.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import socket
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import OptimConfig, TrainConfig
from .logprobs import entropy as token_entropy
from .logprobs import token_logprobs
from .offload import Mode, Offloader, OffloadedError

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "routed_experts")
ModelFactory = Callable[[], nn.Module]


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

    def token_mean(self, values: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of a token-mean over the whole global batch."""
        return (values * self.mask).sum() / max(self.global_num_tokens, 1.0)

    def seq_mean(self, per_seq: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of a mean over all sequences of the global batch."""
        return per_seq.sum() / max(self.global_num_seqs, 1)

    def token_mean_metric(self, values: torch.Tensor) -> float:
        """A metric value that the engine's row-weighted averaging over micro-batches and ranks turns
        into the exact token mean of `values` over the whole global batch."""
        rows = values.shape[0]
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


def _accelerator(mixed_precision: str):
    """accelerate's Accelerator for autocast + fp16 loss scaling; its state is per process, reset if it differs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not cuda:
        raise ValueError("train.mixed_precision=fp16 needs a CUDA device (use bf16 or no on CPU)")
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed_precision, cpu=not cuda)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp_dir), fsync it, then swap it in for `path`; the old copy is removed only after the swap."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainWorker:
    """A training rank. world_size > 1 needs init_distributed() (the driver does it) before train_step."""

    def __init__(self, model_factory: ModelFactory, ref_factory: ModelFactory | None = None,
                 optim: OptimConfig | None = None, train: TrainConfig | None = None, rank: int = 0,
                 world_size: int = 1, offload_mode: Mode = "accounting"):
        from transformers import get_scheduler

        self.optim_cfg = optim or OptimConfig()
        self.train_cfg = train or TrainConfig()
        self.rank, self.world_size = rank, world_size
        self.accelerator = _accelerator(self.train_cfg.mixed_precision)
        self.device = self.accelerator.device
        torch.manual_seed(self.train_cfg.seed)              # identical init on every rank (rank 0 broadcasts too)
        model = model_factory().to(self.device)
        model.train()
        o = self.optim_cfg
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                      weight_decay=o.weight_decay, fused=o.fused)
        name = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[o.schedule]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=o.total_steps)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.ref: nn.Module | None = None
        if ref_factory is not None:
            torch.manual_seed(self.train_cfg.seed)
            self.ref = ref_factory().to(self.device).eval().requires_grad_(False)
        self.offloader = Offloader(offload_mode)
        self.offloader.add_module("policy", self.unwrapped)
        self.offloader.add_optimizer("optimizer", optimizer)
        if self.ref is not None:
            self.offloader.add_module("ref", self.ref)
        self.step = 0                                       # optimizer steps taken = policy weight version
        self._seed_rng()

    # -- setup ---------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _seed_rng(self) -> None:
        seed = self.train_cfg.seed + self.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def master_address(self) -> tuple[str, int]:
        """Rank 0 picks the rendezvous address: this node's IP and a free port."""
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def init_distributed(self, addr: str, port: int, timeout_s: float = 600.0) -> None:
        """Join the process group (gloo on CPU, NCCL on GPU) and take rank 0's weights."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if addr.startswith("127."):                         # all ranks on this host: keep gloo on loopback
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))
        with torch.no_grad():
            for t in list(self.unwrapped.parameters()) + list(self.unwrapped.buffers()):
                dist.broadcast(t.data, src=0)
            if self.ref is not None:
                for t in list(self.ref.parameters()) + list(self.ref.buffers()):
                    dist.broadcast(t.data, src=0)

    def ready(self) -> dict[str, Any]:
        """Where this rank runs (node id, pid, device); also a cheap liveness probe."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"rank": self.rank, "node_id": node, "pid": os.getpid(), "device": str(self.device)}

    @property
    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self._distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    # -- forward -------------------------------------------------------------------------------
    def _micro_batches(self, batch: dict[str, Any], rows: int | None = None) -> list[dict[str, Any]]:
        """The optimiser's micro-batching (micro_batch_size or grad_accum), or `rows` per micro-batch."""
        B = num_rows(batch)
        if B == 0:
            return []
        o = self.optim_cfg
        if rows is not None:
            parts = -(-B // rows)
        else:
            parts = o.grad_accum if o.grad_accum else (-(-B // o.micro_batch_size) if o.micro_batch_size else 1)
        return [mb for mb in split_rows(batch, even_slices(B, min(parts, B))) if num_rows(mb)]

    def _tensors(self, mb: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in mb.items():
            if isinstance(v, np.ndarray):                   # Ray's zero-copy arrays are read-only: copy
                out[k] = torch.from_numpy(np.array(v)).to(self.device)
            elif isinstance(v, torch.Tensor):
                out[k] = v.to(self.device)
            else:
                out[k] = v
        out["loss_mask_shifted"] = torch.as_tensor(loss_mask_of(mb)).to(self.device)
        return out

    def _forward(self, model: nn.Module, t: dict[str, torch.Tensor], grad_entropy: bool,
                 counts: tuple[float, int]) -> Forward:
        kwargs = {k: t[k] for k in MODEL_INPUTS if k in t}
        with self.accelerator.autocast():
            out = model(**kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        logits = logits[:, :-1]
        temperature = float(t["temperature"]) if "temperature" in t else 1.0
        if temperature > 0 and temperature != 1.0:                 # score under the sampling distribution
            logits = logits / temperature
        labels = t["input_ids"][:, 1:]
        chunk = self.train_cfg.logprob_chunk_tokens
        logp = token_logprobs(logits, labels, chunk)
        with torch.set_grad_enabled(grad_entropy and torch.is_grad_enabled()):
            ent = token_entropy(logits, chunk)
        aux = getattr(out, "aux_loss", None)
        aux = aux if isinstance(aux, torch.Tensor) else torch.zeros((), device=logits.device)
        return Forward(logp=logp, entropy=ent, mask=t["loss_mask_shifted"], aux_loss=aux, output=out,
                       global_num_tokens=counts[0], global_num_seqs=counts[1])

    def _global_counts(self, batch: dict[str, Any]) -> tuple[float, int]:
        tokens, seqs = self._all_reduce_sum([float(loss_mask_of(batch).sum()), float(num_rows(batch))])
        return tokens, int(round(seqs))

    def _require(self, *names: str) -> None:
        for n in names:
            slot = self.offloader.slots.get(n)
            if slot is not None and not slot.resident:
                raise OffloadedError(f"rank {self.rank}: '{n}' is offloaded; enter a phase that declares it first")

    # -- training ------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's shard; returns metrics reduced over all ranks (identical on each)."""
        self._require("policy", "optimizer")
        counts = self._global_counts(batch)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = defaultdict(float)
        loss_sum = 0.0
        for mb in self._micro_batches(batch):
            t = self._tensors(mb)
            fwd = self._forward(self.model, t, self.train_cfg.entropy_grad, counts)
            loss, metrics = loss_fn(fwd, t)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise TypeError(f"loss_fn must return (scalar tensor, metrics dict), got {type(loss).__name__}")
            self.accelerator.backward(loss)
            loss_sum += float(loss.detach())
            w = num_rows(mb) / max(counts[1], 1)              # metrics: row-weighted mean over the batch
            for k, v in metrics.items():
                sums[k] += w * float(v)
        params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        for p in params:                                    # unused experts: zero grads on every rank alike
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._all_reduce_grads(params)
        max_norm = self.optim_cfg.max_grad_norm or float("inf")
        grad_norm = float(self.accelerator.clip_grad_norm_(params, max_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        skipped = not np.isfinite(grad_norm)
        if self.accelerator.scaler is not None:             # fp16: the scaler skips and lowers its scale itself
            self.optimizer.step()
            skipped = bool(self.optimizer.step_was_skipped)
            self.scheduler.step()                           # accelerate's wrapper holds still on a skipped step
        elif not skipped:                                   # non-finite grads: no update, schedule holds still
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 0 if skipped else 1
        reduced = self._reduce_metrics({"loss": loss_sum, **sums})
        return {**reduced, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped),
                "num_tokens": counts[0], "num_seqs": float(counts[1]), "step": float(self.step)}

    def _all_reduce_grads(self, params: list[nn.Parameter], bucket_bytes: int = 32 << 20) -> None:
        """SUM over ranks (the loss is already normalised by the global batch), in flat buckets."""
        if not self._distributed:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for g in [p.grad for p in params] + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0

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
        if which == "ref" and self.ref is None:
            raise ValueError("compute_logprobs(which='ref') but the engine has no reference model (train.reference)")
        self._require(which)
        model = self.model if which == "policy" else self.ref
        model.train(mode == "train" and which == "policy")
        ids = np.asarray(batch["input_ids"])
        out = [np.zeros((0, max(ids.shape[1] - 1, 0)), dtype=np.float32)]
        for mb in self._micro_batches(batch, self.train_cfg.logprob_micro_batch_size):
            fwd = self._forward(model, self._tensors(mb), False, (0.0, 0))
            out.append(fwd.logp.float().cpu().numpy())
        return np.concatenate(out)

    # -- weights for refit, checkpoints ----------------------------------------------------------
    def hf_named_arrays(self) -> list[tuple[str, np.ndarray]]:
        """Checkpoint-named float32 numpy weights (per-expert names), for in-process refit."""
        from .refit import hf_named_tensors, to_float32_numpy

        self._require("policy")
        return [(n, to_float32_numpy(t).copy()) for n, t in hf_named_tensors(self.unwrapped)]

    def weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, np.ndarray]]]:
        """Yields buckets of (checkpoint name, float32 array); the driver calls it as a Ray streaming generator."""
        from .refit import buckets, hf_named_tensors

        self._require("policy")
        with torch.no_grad():
            yield from buckets(hf_named_tensors(self.unwrapped), bucket_bytes)

    def offload(self, names: list[str]) -> None:
        self.offloader.offload(names)

    def reload(self, names: list[str]) -> None:
        self.offloader.reload(names)

    def offload_sizes(self) -> dict[str, int]:
        return self.offloader.sizes()

    def get_generation(self) -> int:
        """Policy weight version = optimizer steps taken (saved and restored with checkpoints)."""
        return self.step

    def rng_state(self) -> dict[str, Any]:
        return rng_state()

    def save(self, path: str | os.PathLike, rng_states: list[dict[str, Any]] | None = None) -> None:
        """Rank 0 writes model, optimizer, scheduler, step and every rank's RNG state (atomically)."""
        from safetensors.torch import save_model

        self._require("policy", "optimizer")
        rngs = rng_states if rng_states is not None else [rng_state()]

        def write(tmp: Path) -> None:
            save_model(self.unwrapped, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "world_size": len(rngs)}))

        atomic_dir(Path(path), write)

    def load(self, path: str | os.PathLike) -> int:
        """Restore what save() wrote (every rank reads it: the path must be visible to all training nodes)."""
        from safetensors.torch import load_model

        self._require("policy", "optimizer")
        path = Path(path)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"{path}: not a checkpoint written by TrainWorker.save (no trainer_state.json)")
        missing, unexpected = load_model(self.unwrapped, str(path / "model.safetensors"), strict=True,
                                         device=str(self.device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        state = json.loads((path / "trainer_state.json").read_text())
        self.step = int(state["step"])
        rngs = torch.load(path / "rng.pt", weights_only=False)
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            log.warning("checkpoint %s has RNG states for %d ranks, running %d: reseeding", path, len(rngs),
                        self.world_size)
            self._seed_rng()
        return self.step

    def export_hf(self, path: str | os.PathLike) -> None:
        """The policy as an HF checkpoint directory (what a rollout backend or evaluation loads)."""
        self._require("policy")
        atomic_dir(Path(path), lambda tmp: self.unwrapped.save_pretrained(tmp))

    def shutdown(self) -> None:
        if self._distributed:
            dist.destroy_process_group()

"""What CI cannot check, on one GPU in under 4 minutes: one JSON line per check (flushed), then a summary.

    PYTHONPATH=. python3 benchmarks/gpu_check.py              # on the GPU machine
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu-smoke  # the same checks at tiny size on CPU (CI-ish)
    PYTHONPATH=. python3 benchmarks/gpu_check.py --only mla_decode cuda_ipc_refit

Needs torch, transformers, accelerate (and peft) only: vLLM, Ray and TRL are imported lazily, by the
checks that need them, which report "skipped" where they are missing. Every check runs in its own
spawned process under its own timeout (a hang or a CUDA fault is that check's failure, not the
script's), and the exit status is 1 if any check failed. On a machine without CUDA (and without
--cpu-smoke) it says so and exits 0.

The model is DeepSeek-V2-Lite-shaped: V2-Lite's real layer dimensions (hidden 2048, 16 heads, kv_lora
512, rope 64, nope 128, v 128, dense FFN 10944, 64 routed experts of 1408 top-6, 2 shared, vocab
102400), 4 layers with the first dense, in bf16. Checks:
  env             torch / CUDA / device, which optional packages are importable
  mla_decode      native absorbed-MLA decode: tokens/s, and its log-probs equal the full forward's
                  (fp32 on the same weights: tight; bf16: loose, reported)
  grouped_gemm    model.moe.expert_swiglu grouped (torch._grouped_mm) vs the per-expert loop: speed, equality
  fsdp2_step      one fsdp2 bf16 train step of engine.train.TrainWorker at world size 1 (spawned, NCCL)
  cuda_ipc_refit  engine.weight_sync CUDA-IPC refit between two processes on the one GPU: seconds, GB/s,
                  bit-exact weights on the receiving side (per-tensor checksums), per-bucket checksums on
  offload         engine.offload real mode: weights + AdamW state off the GPU and back (bytes freed and
                  restored, bit-identical)
  routing_replay  rollout's routed experts (MoE layers, worker alignment) replayed in the full forward:
                  trainer log-probs match the rollout's
  vllm            only where vLLM is importable (not on the lent machine): rollout with routed experts,
                  sleep / wake(weights) / refit / wake(kv_cache) / prefix-cache reset
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import sys
import time
import traceback

LITE = dict(vocab_size=102400, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, intermediate_size=10944,
            moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
            first_k_dense_replace=1, num_hidden_layers=4, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
SMOKE = dict(LITE, vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
             qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, intermediate_size=256,
             moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1)


# -- helpers (run inside the check processes) --------------------------------------------------------
def _device(smoke: bool):
    import torch

    return torch.device("cpu" if smoke else "cuda")


def _build(smoke: bool, dtype=None, seed: int = 0):
    """The V2-Lite-shaped network, initialised directly on the device (no 9 GB CPU detour)."""
    import torch

    import model

    device = _device(smoke)
    with torch.device(device):
        net = model.build("v2-lite", seed=seed, **(SMOKE if smoke else LITE))
    return net.to(dtype or torch.bfloat16).eval()


def _sync(smoke: bool) -> None:
    import torch

    if not smoke:
        torch.cuda.synchronize()


def _sizes(smoke: bool) -> dict:
    return dict(batch=2, prompt=16, new=8) if smoke else dict(batch=8, prompt=128, new=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the checks -------------------------------------------------------------------------------------
def check_env(smoke: bool) -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
           "optional": {m: importlib.util.find_spec(m) is not None for m in ("accelerate", "peft", "vllm", "ray", "trl")}}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=list(torch.cuda.get_device_capability(0)), memory_gib=round(p.total_memory / 2**30, 1))
    out["ok"] = smoke or torch.cuda.is_available()
    return out


def check_mla_decode(smoke: bool) -> dict:
    """Greedy absorbed decode (model.generate.sample) vs the full forward on prompt + completion."""
    import torch

    from model.generate import sample

    torch.backends.cuda.matmul.allow_tf32 = False
    s = _sizes(smoke)
    out = {}
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, None)):
        net = _build(smoke, dtype)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(3, net.config.vocab_size, (s["prompt"],), generator=g).tolist() for _ in range(s["batch"])]
        sample(net, prompts[:1], 2, temperature=0.0, stop_token_ids=())             # warm-up
        _sync(smoke)
        t0 = time.perf_counter()
        samples = sample(net, prompts, s["new"], temperature=0.0, stop_token_ids=(), logprobs_mode="raw")
        _sync(smoke)
        dt = time.perf_counter() - t0
        ids = torch.tensor([p + x.token_ids for p, x in zip(prompts, samples)], device=_device(smoke))
        with torch.no_grad():
            logits = net(ids).logits[:, s["prompt"] - 1:-1].float()
        full = logits.log_softmax(-1).gather(-1, ids[:, s["prompt"]:, None])[..., 0]
        dec = torch.tensor([x.logprobs for x in samples], device=full.device)
        agree = float((logits.argmax(-1) == ids[:, s["prompt"]:]).float().mean())
        # a randomly initialised model has near-flat logits, so bf16 rounding can flip the argmax: what must
        # hold is that the decoded token is (near) the full forward's best, and the log-probs agree
        gap = logits.log_softmax(-1).max(-1).values - full
        name = str(dtype).removeprefix("torch.")
        out[name] = {"tokens_per_s": round(s["batch"] * s["new"] / dt, 1), "max_abs_logp_diff": float((full - dec).abs().max()),
                     "mean_abs_logp_diff": float((full - dec).abs().mean()), "greedy_argmax_agreement": agree,
                     "near_argmax_share": float((gap <= 0.1).float().mean())}
        if tol is not None:
            out[name]["ok"] = out[name]["max_abs_logp_diff"] <= tol and agree == 1.0
        else:
            out[name]["ok"] = out[name]["mean_abs_logp_diff"] <= 0.1 and out[name]["near_argmax_share"] >= 0.99
        del net
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_grouped_gemm(smoke: bool) -> dict:
    import torch

    import model.moe as moe

    if not hasattr(moe, "expert_swiglu") or not hasattr(torch, "_grouped_mm"):
        return {"ok": True, "skipped": "grouped-GEMM path not present (model.moe.expert_swiglu / torch._grouped_mm)"}
    cfg = SMOKE if smoke else LITE
    E, H, I, k = cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
    N = 256 if smoke else 4096
    dev, dt = _device(smoke), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N * k, H, device=dev, dtype=dt, generator=g)
    gate_up = torch.randn(E, 2 * I, H, device=dev, dtype=dt, generator=g) * H ** -0.5
    down = torch.randn(E, H, I, device=dev, dtype=dt, generator=g) * I ** -0.5
    counts = torch.bincount(torch.randint(0, E, (N * k,), device=dev, generator=g), minlength=E)
    usable = moe.grouped_mm_ok(x, gate_up, down)
    if not usable:
        return {"ok": True, "skipped": f"torch._grouped_mm not usable here (grouped_mm_ok False on {dev})"}

    def timed(grouped: bool) -> tuple[torch.Tensor, float]:
        y = moe.expert_swiglu(x, counts, gate_up, down, grouped=grouped)             # warm-up
        _sync(smoke)
        t0 = time.perf_counter()
        for _ in range(5):
            y = moe.expert_swiglu(x, counts, gate_up, down, grouped=grouped)
        _sync(smoke)
        return y, (time.perf_counter() - t0) / 5

    yg, tg = timed(True)
    yl, tl = timed(False)
    rel = float((yg.float() - yl.float()).norm() / yl.float().norm())
    return {"ok": rel <= 2e-2, "rows": N * k, "grouped_ms": round(tg * 1e3, 3), "loop_ms": round(tl * 1e3, 3),
            "speedup": round(tl / tg, 2), "rel_diff": rel}


def _lm_batch(vocab: int, B: int, T: int, device):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, (B, T))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}


def _nll(fwd, mb):
    return fwd.token_mean(-fwd.logp), {}


def _factory(smoke: bool):
    import torch

    return _build(smoke, torch.float32).train()


def check_fsdp2_step(smoke: bool) -> dict:
    """engine.train.TrainWorker, sharding=fsdp2 with bf16 compute, world size 1 (this spawned process)."""
    import functools

    import torch

    from engine.config import OptimConfig, TrainConfig
    from engine.train import TrainWorker

    cfg = SMOKE if smoke else LITE
    w = TrainWorker(functools.partial(_factory, smoke), optim=OptimConfig(lr=1e-4),
                    train=TrainConfig(sharding="fsdp2", mixed_precision="bf16"))
    w.init_distributed("127.0.0.1", _free_port(), 120)
    batch = _lm_batch(cfg["vocab_size"], 2, 64 if smoke else 512, w.device)
    before = next(iter(w.hf_named_arrays()))[1].copy() if smoke else None
    _sync(smoke)
    t0 = time.perf_counter()
    m = w.train_step(batch, _nll)
    _sync(smoke)
    out = {"step_s": round(time.perf_counter() - t0, 3), "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
           "step": int(m["step"]), "device": str(w.device)}
    if not smoke:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finite = all(map(lambda v: v == v and abs(v) < float("inf"), (out["loss"], out["grad_norm"])))
    out["ok"] = finite and out["step"] == 1 and out["grad_norm"] > 0
    if before is not None:
        out["ok"] = out["ok"] and bool((next(iter(w.hf_named_arrays()))[1] != before).any())
    w.shutdown()
    return out


def _tensor_sums(net) -> dict:
    import torch

    return {n: int(p.detach().contiguous().view(-1).view(torch.int16).to(torch.int64).sum()) if p.dtype == torch.bfloat16
            else float(p.detach().double().sum()) for n, p in net.named_parameters()}


def _ipc_receiver(smoke: bool, conn) -> None:
    """The engine side: its own copy of the network (other weights), buckets in through CUDA IPC handles."""
    try:
        import torch

        from engine.rollout_native import NativeRollout
        from engine.weight_sync import unpack, verify
        from engine.weight_sync.cuda_ipc import receive

        engine = NativeRollout(network=_build(smoke, seed=1))
        conn.send("ready")
        while True:
            msg = conn.recv()
            if msg is None:
                break
            meta, handle = msg
            buf = receive(meta, handle)
            verify(meta, buf, "receiver")
            engine.load_weights(iter(unpack(meta, buf)))
            torch.cuda.synchronize()
            del buf
            conn.send(meta.nbytes)
        conn.send(_tensor_sums(engine.network))
    except BaseException as e:  # noqa: BLE001
        conn.send(f"receiver failed: {type(e).__name__}: {e}")


def check_cuda_ipc_refit(smoke: bool) -> dict:
    if smoke:
        return {"ok": True, "skipped": "CUDA IPC needs a GPU"}
    import torch

    from engine.refit import hf_named_tensors
    from engine.weight_sync.cuda_ipc import IpcSender

    net = _build(smoke, seed=0)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=_ipc_receiver, args=(smoke, theirs))
    proc.start()
    try:
        if not ours.poll(120) or ours.recv() != "ready":
            return {"ok": False, "error": "receiver did not start"}
        sender = IpcSender(keep=2)
        stream = sender.send(hf_named_tensors(net), 256 << 20, torch.bfloat16, True, torch.device("cuda"))
        t0 = time.perf_counter()
        nbytes = nbuckets = 0
        for meta in stream:
            handle = next(stream)
            ours.send((meta, handle))
            if not ours.poll(60):
                return {"ok": False, "error": f"bucket {meta.index}: no answer within 60 s"}
            got = ours.recv()
            if isinstance(got, str):
                return {"ok": False, "error": got}
            nbytes, nbuckets = nbytes + got, nbuckets + 1
        dt = time.perf_counter() - t0
        ours.send(None)
        if not ours.poll(60):
            return {"ok": False, "error": "receiver sent no checksums"}
        theirs_sums = ours.recv()
        if isinstance(theirs_sums, str):
            return {"ok": False, "error": theirs_sums}
        sender.release()
        mine = _tensor_sums(net)
        diff = [n for n in mine if mine[n] != theirs_sums.get(n)]
        return {"ok": not diff, "refit_s": round(dt, 3), "gb": round(nbytes / 1e9, 3), "gb_per_s": round(nbytes / 1e9 / dt, 2),
                "buckets": nbuckets, "tensors_differing": diff[:5]}
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def check_offload(smoke: bool) -> dict:
    """engine.offload.Offloader(real): policy weights and AdamW state leave the device and come back."""
    import torch

    from engine.offload import Offloader

    net = _build(smoke, torch.float32 if smoke else torch.bfloat16).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    ids = torch.randint(3, net.config.vocab_size, (1, 32), device=_device(smoke))
    net(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = _tensor_sums(net)
    off = Offloader("real")
    off.add_module("policy", net)
    off.add_optimizer("optimizer", opt)
    sizes = off.sizes()
    mem = (lambda: torch.cuda.memory_allocated()) if not smoke else (lambda: 0)
    _sync(smoke)
    m0 = mem()
    t0 = time.perf_counter()
    off.offload(["policy", "optimizer"])
    _sync(smoke)
    if not smoke:
        torch.cuda.empty_cache()
    m1 = mem()
    t1 = time.perf_counter()
    off.reload(["policy", "optimizer"])
    _sync(smoke)
    m2 = mem()
    t2 = time.perf_counter()
    expected = sizes["policy"] + sizes["optimizer"]
    out = {"policy_bytes": sizes["policy"], "optimizer_bytes": sizes["optimizer"], "freed_bytes": m0 - m1,
           "restored_bytes": m2 - m1, "offload_s": round(t1 - t0, 3), "reload_s": round(t2 - t1, 3),
           "bit_identical": _tensor_sums(net) == before}
    out["ok"] = out["bit_identical"] and (smoke or (out["freed_bytes"] >= 0.95 * expected and
                                                    out["restored_bytes"] >= 0.95 * expected))
    return out


def check_routing_replay(smoke: bool) -> dict:
    """Sampled rollout (routed experts captured, aligned to MoE layers by the rollout worker's helper),
    then the training forward with those experts replayed: its log-probs of the sampled tokens match."""
    import torch

    from engine.rollout_worker import align_routing
    from model.generate import sample
    from model.network import moe_layer_indices

    torch.backends.cuda.matmul.allow_tf32 = False
    net = _build(smoke, torch.float32)
    s = _sizes(smoke)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, net.config.vocab_size, (s["prompt"],), generator=g).tolist() for _ in range(s["batch"])]
    samples = sample(net, prompts, s["new"], temperature=1.0, stop_token_ids=(), seed=[7 + i for i in range(len(prompts))],
                     return_routing=True, logprobs_mode="raw")
    layout = (net.config.num_hidden_layers, moe_layer_indices(net.config), net.config.n_routed_experts)
    routed = [align_routing([r.numpy() for r in x.routed_experts], layout) for x in samples]
    ids = torch.tensor([p + x.token_ids for p, x in zip(prompts, samples)], device=_device(smoke))
    replay = torch.stack([torch.stack([torch.as_tensor(r.astype("int64")) for r in per]) for per in routed]).to(ids.device)
    P = s["prompt"]
    out = {}
    for name, kw in (("with_replay", {"routed_experts": replay}), ("without", {})):
        with torch.no_grad():
            logits = net(ids, **kw).logits[:, P - 1:-1].float()
        full = logits.log_softmax(-1).gather(-1, ids[:, P:, None])[..., 0]
        dec = torch.tensor([x.logprobs for x in samples], device=full.device)
        out[name] = {"max_abs_logp_diff": float((full - dec).abs().max()), "mean_abs_logp_diff": float((full - dec).abs().mean())}
    out["moe_layers"] = int(replay.shape[1])
    out["ok"] = out["with_replay"]["max_abs_logp_diff"] <= 2e-3 and replay.shape[1] == len(layout[1])
    return out


def check_vllm(smoke: bool) -> dict:
    if importlib.util.find_spec("vllm") is None:
        return {"ok": True, "skipped": "vLLM not importable: sleep/wake/refit order checked only by "
                                       "tests/test_engine_sleep_wake.py (recording fake)"}
    if smoke:
        return {"ok": True, "skipped": "vLLM parts need a GPU (sleep mode, routed experts)"}
    import tempfile

    import torch

    from engine.refit import hf_named_tensors
    from engine.rollout_vllm import VLLMRollout
    from engine.rollout_worker import RolloutWorker
    from engine.sampling import SamplingConfig

    net = _build(smoke, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        net.save_pretrained(tmp)
        worker = RolloutWorker(lambda d, **kw: VLLMRollout(d, return_routed_experts=True, gpu_memory_utilization=0.3,
                                                          max_model_len=1024), tmp)
        first = worker.generate([[5, 6, 7, 8]], SamplingConfig(n=2, max_tokens=8, seed=0))
        worker.sleep()
        worker.wake(["weights"])
        named = [(n, t.to(torch.bfloat16)) for n, t in hf_named_tensors(_build(smoke, seed=3))]
        worker.impl.load_weights(iter(named))
        worker.finish_refit(1)
        worker.wake(["kv_cache"])
        after = worker.generate([[5, 6, 7, 8]], SamplingConfig(n=1, temperature=0.0, max_tokens=8))
        worker.shutdown()
    ok = first[0].routed_experts is not None and len(first[0].routed_experts) == 3 and not worker.prefix_stale
    return {"ok": ok, "routed_layers": len(first[0].routed_experts or []), "tokens_after_refit": after[0].token_ids}


CHECKS = {"env": (check_env, 20), "mla_decode": (check_mla_decode, 45), "grouped_gemm": (check_grouped_gemm, 25),
          "fsdp2_step": (check_fsdp2_step, 60), "cuda_ipc_refit": (check_cuda_ipc_refit, 45),
          "offload": (check_offload, 45), "routing_replay": (check_routing_replay, 30), "vllm": (check_vllm, 90)}
BUDGET_S = 230.0                         # the whole run, GPU mode: a check gets at most what is left


# -- the runner -------------------------------------------------------------------------------------
def _run_one(name: str, smoke: bool, conn) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        t0 = time.perf_counter()
        result = CHECKS[name][0](smoke)
        result.setdefault("seconds_total", round(time.perf_counter() - t0, 3))
    except BaseException as e:  # noqa: BLE001 - reported as the check's failure
        tb = traceback.format_exc().strip().splitlines()
        result = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  "where": tb[-3:] if len(tb) >= 3 else tb}
    conn.send(result)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="run every check at tiny size on the CPU")
    ap.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every check's timeout")
    args = ap.parse_args()
    import torch

    def emit(obj: dict) -> None:
        print(json.dumps(obj, default=str), flush=True)

    if not args.cpu_smoke and not torch.cuda.is_available():
        emit({"check": "env", "ok": True, "cuda": False, "torch": torch.__version__,
              "note": "no CUDA GPU on this machine: nothing checked (run with --cpu-smoke for the tiny CPU version)"})
        emit({"summary": "no GPU", "passed": 0, "failed": 0, "skipped": len(CHECKS)})
        return 0
    names = args.only or list(CHECKS)
    ctx = mp.get_context("spawn")
    passed = failed = skipped = 0
    start = time.perf_counter()
    for name in names:
        timeout = CHECKS[name][1] * args.timeout_scale * (3 if args.cpu_smoke else 1)
        if not args.cpu_smoke:
            timeout = min(timeout, BUDGET_S * args.timeout_scale - (time.perf_counter() - start))
            if timeout < 5:
                emit({"check": name, "ok": True, "skipped": f"out of time (the run's budget is {BUDGET_S:.0f}s)"})
                skipped += 1
                continue
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_run_one, args=(name, args.cpu_smoke, theirs), daemon=False)
        t0 = time.perf_counter()
        proc.start()
        result = ours.recv() if ours.poll(timeout) else {"ok": False, "error": f"timed out after {timeout:.0f}s"}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if proc.exitcode not in (0, None) and result.get("ok") and "error" not in result:
            result = {**result, "ok": False, "error": f"check process exited with {proc.exitcode}"}
        result = {"check": name, "ok": bool(result.pop("ok", False)), "seconds": round(time.perf_counter() - t0, 2),
                  **result}
        emit(result)
        if "skipped" in result:
            skipped += 1
        elif result["ok"]:
            passed += 1
        else:
            failed += 1
    emit({"summary": "cpu-smoke" if args.cpu_smoke else "gpu", "passed": passed, "failed": failed, "skipped": skipped,
          "seconds": round(time.perf_counter() - start, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

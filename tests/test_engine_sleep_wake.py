"""Sleep / wake / refit ordering and per-GPU offload accounting against a recording fake vLLM engine.

The rollout backend is engine.rollout_vllm.VLLMRollout itself (its sleep, wake, load_weights,
finish_refit, reset_prefix_cache code) on top of a fake vllm.LLM that records every call; only
generate is a stand-in (it returns fixed tokens). The GPU calls themselves run only in
benchmarks/gpu_check.py where vLLM is installed. Expected order, per the vLLM docs: sleep after the
rollout; wake only the weights before the refit; refit; then bring the KV cache back and reset the
prefix cache (and check that it was reset) before the next rollout."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_ray import ray_session  # noqa: E402,F401  (the module's Ray session fixture)
from test_engine_standin import register_for_ray, save_tiny_checkpoint, tiny_policy, weighted_nll  # noqa: E402

from engine.config import ClusterConfig, OffloadConfig, OptimConfig, RolloutConfig, TrainConfig  # noqa: E402
from engine.driver import HybridEngine  # noqa: E402
from engine.offload import OffloadedError  # noqa: E402
from engine.rollout_vllm import VLLMRollout  # noqa: E402
from engine.rollout_worker import RolloutWorker  # noqa: E402
from engine.sampling import Rollout, SamplingConfig  # noqa: E402


class FakeLLM:
    """Records the vllm.LLM calls VLLMRollout makes (as JSON lines, readable from the test process)."""

    def __init__(self, record: str, reset_ok: bool = True):
        self.record, self.reset_ok = record, reset_ok

    def _log(self, *entry) -> None:
        with open(self.record, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self._log("sleep", level)

    def wake_up(self, tags=None) -> bool:
        self._log("wake_up", tags)
        return True

    def reset_prefix_cache(self, *a) -> bool:
        self._log("reset_prefix_cache")
        return self.reset_ok

    def collective_rpc(self, method: str, args=()):
        if method == "refit_load":
            self._log(method, sorted({str(t.dtype) for _, t in args[0]}))
        else:
            self._log(method)


class RecordingVLLM(VLLMRollout):
    """VLLMRollout as on a GPU (sleep mode and prefix caching on), over FakeLLM; generate is a stand-in."""

    def __init__(self, model_dir, record: str = "", reset_ok: bool = True):
        self.model_dir, self.on_cpu, self.prefix_caching = Path(model_dir), False, True
        self.refit_open, self._prefix_stale = False, False
        self.mode = SimpleNamespace(dtype="bfloat16")
        self.llm = FakeLLM(record, reset_ok)

    def generate(self, prompt_token_ids, sampling, prompt_indices=None):
        self.finish_refit()
        if self._prefix_stale and not self.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a refit")
        self.llm._log("generate")
        return [Rollout(i, list(p), [3, 4, 5], [-1.0] * 3, "", "length") for i, p in enumerate(prompt_token_ids)
                for _ in range(sampling.n)]

    def shutdown(self) -> None:
        pass


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


def _calls(path: Path) -> list[list]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sleep_wake_refit_order_and_per_gpu_offload(ray_session, ckpt, tmp_path):  # noqa: F811
    import ray.cloudpickle

    register_for_ray()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    record = tmp_path / "calls.jsonl"
    eng = HybridEngine(ClusterConfig(placement="colocated", actor_threads=1),
                       RolloutConfig(kwargs={"record": str(record)}), OptimConfig(lr=0.1),
                       TrainConfig(world_size=2), ckpt, tmp_path / "run", OffloadConfig(mode="real"),
                       model_factory=tiny_policy, rollout_backend=RecordingVLLM)
    try:
        rollouts = eng.generate([[1, 5, 9], [1, 7, 7]], SamplingConfig(n=2, max_tokens=3))
        ids = np.array([r.prompt_token_ids + r.token_ids for r in rollouts])
        batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
                 "weight": np.linspace(-1, 1, len(ids)).astype(np.float32)}
        # rollout phase on GPU 0: rank 0 (shares it with the engine) is offloaded, rank 1 (own GPU) is not
        with pytest.raises(OffloadedError):
            ray.get(eng.workers[0].compute_logprobs.remote(batch))
        assert ray.get(eng.workers[1].compute_logprobs.remote(batch)).shape == (4, ids.shape[1] - 1)
        eng.train_step(batch, weighted_nll)
        eng.sync_weights()
        eng.generate([[1, 5, 9]], SamplingConfig(n=1, max_tokens=3))
    finally:
        eng.shutdown()
    calls = [c[0] if c[0] != "refit_load" else f"refit_load {c[1]}" for c in _calls(record)]
    loads = [c for c in calls if c.startswith("refit_load")]
    assert loads and set(loads) == {"refit_load ['torch.bfloat16']"}          # served dtype, no fp32 up-cast
    compact = [c for i, c in enumerate(calls) if not (c.startswith("refit_load") and calls[i - 1] == c)]
    assert compact == ["generate", "sleep", "wake_up", "refit_begin", "refit_load ['torch.bfloat16']",
                       "refit_finish", "wake_up", "reset_prefix_cache", "generate"], compact
    raw = _calls(record)
    assert [c for c in raw if c[0] in ("sleep", "wake_up")] == [["sleep", 1], ["wake_up", ["weights"]],
                                                                ["wake_up", ["kv_cache"]]]
    # accounting per GPU: one scheduler (GPU 0) counting rank 0's own bytes, never summed over the ranks
    assert list(eng.offloads) == [0]
    plans = {p.phase: p for p in eng.offload.history}
    n_params = sum(p.numel() for p in tiny_policy().parameters())
    policy = eng._sizes[0]["policy"]
    assert policy == eng._sizes[1]["policy"] and 4 * n_params <= policy < 4 * n_params + 4096   # fp32, one copy
    engine_bytes = eng.offload.items["rollout_weights"].size()
    assert plans["refit"].resident == ["policy", "rollout_weights"]
    assert plans["refit"].resident_bytes == policy + engine_bytes
    assert plans["rollout"].resident_bytes == engine_bytes > 0


def test_failed_prefix_cache_reset_is_an_error(tmp_path, ckpt):
    worker = RolloutWorker(RecordingVLLM, str(ckpt), record=str(tmp_path / "c.jsonl"), reset_ok=False)
    worker.load_weights([])
    worker.finish_refit(1)
    with pytest.raises(RuntimeError, match="prefix cache reset after refit failed"):
        worker.generate([[1, 2]], SamplingConfig(max_tokens=2))
    worker.sleep()
    with pytest.raises(RuntimeError, match="refit while its weights are released"):
        worker.receive_bucket("object_store", None, None)
    worker.wake(["weights"])
    with pytest.raises(RuntimeError, match=r"asleep \(\['kv_cache'\] released\)"):
        worker.generate([[1, 2]], SamplingConfig(max_tokens=2))

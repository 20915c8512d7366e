"""LoRA GRPO (engine/train/lora.py, engine/lora_sync.py): adapters on MLA projections and routed experts,
the base with adapters off as the reference, adapter-only refit, checkpoints and the merged export.

Oracles: the trainable-parameter count worked out by hand from r and the tiny preset's shapes; the base
weights' bytes at the start; a separately loaded base model (reference log-probs); peft's own merge and
PeftModel (merged weights, the exported adapter); transformers' DeepseekV2 (the merged export); a second
rollout engine refit with the full merged weights (adapter-only refit); an uninterrupted run (kill -9 +
--resume through align grpo, tests/test_resume.py's helper). fsdp2 with LoRA: test_grpo_lora_fsdp.py.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoTokenizer

import model
from align.data.loading import DataSource
from align.grpo.config import GRPOConfig
from align.grpo.loop import grpo_step, load_policy
from align.grpo.prompts import PromptStream, load_prompt_rows
from engine.config import EngineConfig, LoraConfig, OptimConfig, TrainConfig
from engine.lora_sync import refit_payload
from engine.rollout_native import NativeRollout
from engine.rollout_worker import RolloutWorker
from engine.sampling import SamplingConfig
from engine.train import TrainWorker
from engine.train import lora
from rewards.combine import RewardComponent, RewardSet
from tests.fsdp_fixture import batch, one_thread
from tests.grpo_fixture import InProcessEngine, make_policy, write_prompts
from tests.test_resume import align, assert_same_metrics, kill_after_checkpoint_then_resume

ATTENTION = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
single_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


def hand_count(c, r: int, attention: bool = True, experts: bool = True) -> int:
    """LoRA adds r * (in + out) per targeted matrix; a 3-D expert tensor [E, out, in] gets r * E * (in + out)."""
    h, heads = c.hidden_size, c.num_attention_heads
    attn = (r * (h + heads * (c.qk_nope_head_dim + c.qk_rope_head_dim))          # q_proj (no q_lora_rank)
            + r * (h + c.kv_lora_rank + c.qk_rope_head_dim)                       # kv_a_proj_with_mqa
            + r * (c.kv_lora_rank + heads * (c.qk_nope_head_dim + c.v_head_dim))  # kv_b_proj
            + r * (heads * c.v_head_dim + h))                                     # o_proj
    e, i = c.n_routed_experts, c.moe_intermediate_size
    routed = r * e * (h + 2 * i) + r * e * (i + h)             # gate_up_proj [E, 2I, H], down_proj [E, H, I]
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    return c.num_hidden_layers * attn * attention + moe_layers * routed * experts


@pytest.mark.parametrize("attention,experts", [(True, True), (True, False), (False, True)])
def test_trainable_count_is_the_hand_count_on_the_tiny_preset(attention, experts):
    c = model.make_config("tiny")
    assert hand_count(c, 1) == 4 * 2624 + 3 * 7168 == 32000      # 4 layers of attention, 3 MoE layers
    cfg = LoraConfig(r=4, alpha=8, target_modules=ATTENTION if attention else [],
                     target_experts=["gate_up_proj", "down_proj"] if experts else [])
    tiny = functools.partial(model.build, "tiny", seed=0)
    w = TrainWorker(tiny, tiny, OptimConfig(), TrainConfig(lora=cfg, reference=True))
    want = hand_count(c, 4, attention, experts)
    assert lora.trainable_count(w.unwrapped) == want == lora.count_for(c, cfg)
    assert sum(len(g["params"]) for g in w.raw_optimizer.param_groups) == len(lora.targets(w.unwrapped)) * 2
    assert w.ref is None and w.ref_is_base and "ref" not in w.offload_sizes()     # no reference copy


def test_config_errors_and_the_grpo_block():
    with pytest.raises(ValueError, match="dropout must be 0"):
        LoraConfig(dropout=0.1)
    assert LoraConfig(dropout=0.1, target_experts=[]).dropout == 0.1
    with pytest.raises(ValueError, match="sync=adapter"):
        refit_payload("adapter", backend_applies_adapters=False)
    assert [refit_payload("auto", b) for b in (True, False)] == ["adapter", "merged"]
    cfg = GRPOConfig(init_from="x", data=[], rewards=[], lora=LoraConfig(r=2))
    assert cfg.engine.train.lora == LoraConfig(r=2)                # what the trainer reads
    assert GRPOConfig.model_validate(cfg.model_dump()).engine.train.lora == LoraConfig(r=2)


class LoraEngine(InProcessEngine):
    """The in-process engine, refit two ways: adapters into its rollout engine (native load_adapter), the full
    merged weights into a second one. Records the bytes of every payload and both engines' greedy outputs."""

    GREEDY = SamplingConfig(n=1, temperature=0.0, max_tokens=8)

    def __init__(self, policy_dir, cfg, prompts: list[list[int]]):
        super().__init__(policy_dir, cfg)
        self.full_rollout = RolloutWorker("native", str(policy_dir))
        self.policy_dir, self.prompts, self.records = str(policy_dir), prompts, []

    def sync_weights(self):
        sent = {p: [x for b in self.trainer.weight_buckets(1 << 16, p) for x in b] for p in ("adapter", "merged",
                                                                                               "full")}
        nbytes = {p: self.rollout.load_adapter(sent[p])[1] if p == "adapter" else sum(a.nbytes for _, a in sent[p])
                  for p in sent}
        self.full_rollout.load_weights(sent["full"])
        merged = model.from_pretrained(self.policy_dir)
        merged.load_state_dict(dict(lora.merged_state(self.trainer.unwrapped)))
        greedy = {name: [r.token_ids for r in engine.generate(self.prompts, self.GREEDY)]
                  for name, engine in (("adapter", self.rollout), ("full", self.full_rollout),
                                       ("trainer", NativeRollout(network=merged)))}
        a, f = self.rollout.impl.network.state_dict(), self.full_rollout.impl.network.state_dict()
        self.records.append({"bytes": nbytes, "greedy": greedy,
                             "weights_gap": max(float((a[k] - f[k]).abs().max()) for k in a)})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 LoRA GRPO steps (beta > 0: reference log-probs from the adapters-off policy) on the fixture policy."""
    root = tmp_path_factory.mktemp("lora")
    policy = make_policy(root)
    prompts = write_prompts(root / "prompts.jsonl")
    cfg = GRPOConfig(init_from=str(policy), data=[DataSource(source=str(prompts))],
                     rewards=[RewardComponent(spec="tests.grpo_fixture:brevity", name="r")], steps=3,
                     prompts_per_step=2, group_size=4, beta=0.04, seed=0,
                     sampling=SamplingConfig(temperature=1.0, max_tokens=8),
                     lora=LoraConfig(r=4, alpha=8), engine=EngineConfig(optim=OptimConfig(lr=3e-2)))
    tokenizer = AutoTokenizer.from_pretrained(policy)
    greedy_prompts = [tokenizer(f"Count to {k}:")["input_ids"] for k in (2, 5)]
    engine = LoraEngine(policy, cfg, greedy_prompts)
    start = {k: v.clone() for k, v in engine.trainer.unwrapped.state_dict().items() if ".lora_" not in k}
    stream, rewards = PromptStream(load_prompt_rows(cfg.data), cfg.seed), RewardSet(cfg.rewards)
    metrics = []
    for step in range(cfg.steps):
        step_cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"seed": 11 + step})})
        metrics.append(grpo_step(engine, tokenizer, step_cfg, stream, rewards, None, step + 1))
    return {"engine": engine, "start": start, "metrics": metrics, "policy": policy, "root": root}


def test_three_steps_leave_the_base_bit_identical(trained):
    w = trained["engine"].trainer
    assert [m["train/step"] for m in trained["metrics"]] == [1.0, 2.0, 3.0]
    now = {k: v for k, v in w.unwrapped.state_dict().items() if ".lora_" not in k}
    assert now.keys() == trained["start"].keys()
    assert all(torch.equal(now[k], trained["start"][k]) for k in now)        # bit for bit
    moved = [float(p.detach().abs().max()) for n, p in w.unwrapped.named_parameters() if "lora_B" in n]
    assert min(moved) > 0, "an adapter never trained (lora_B starts at zero)"


def test_rollout_greedy_equals_the_trainers_merged_greedy_after_each_refit(trained):
    records = trained["engine"].records
    assert len(records) == 3
    for r in records:
        assert r["greedy"]["adapter"] == r["greedy"]["trainer"] == r["greedy"]["full"]
        assert r["weights_gap"] < 1e-6                          # adapter refit == full merged refit, weight by weight
        assert r["bytes"]["adapter"] < r["bytes"]["merged"] < r["bytes"]["full"]
    base = model.from_pretrained(trained["policy"]).state_dict()
    after = trained["engine"].rollout.impl.network.state_dict()
    assert max(float((after[k] - base[k]).abs().max()) for k in base) > 1e-4, "the refit changed nothing"


def test_reference_logprobs_with_adapters_off_equal_the_base_model(trained):
    w = trained["engine"].trainer
    b = batch(seed=3)                                       # token ids < 128, inside the fixture's vocabulary
    ref = w.compute_logprobs(b, "ref")
    base = TrainWorker(functools.partial(load_policy, str(trained["policy"]), None)).compute_logprobs(b, "policy")
    np.testing.assert_allclose(ref, base, atol=1e-6, rtol=0)
    assert np.abs(w.compute_logprobs(b, "policy") - ref).max() > 1e-4, "the adapters changed nothing"


def test_merged_weights_equal_peft_merge_and_the_export_loads_in_transformers_and_peft(trained, tmp_path):
    import copy

    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    w = trained["engine"].trainer
    merged = dict(lora.merged_state(w.unwrapped))
    by_peft = copy.deepcopy(w.unwrapped)
    for m in by_peft.modules():
        if isinstance(m, BaseTunerLayer):
            m.merge()
    peft_state = {lora.clean_name(k): v for k, v in by_peft.state_dict().items() if ".lora_" not in k}
    assert peft_state.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], peft_state[k], atol=1e-6, rtol=0)

    w.export_hf(tmp_path / "export")
    ids = torch.tensor([[1, 4, 20, 30, 31, 32, 2, 20, 5, 21, 17, 18]])
    with torch.no_grad():
        want = w.unwrapped.eval()(input_ids=ids).logits
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(model.from_pretrained(trained["policy"]), tmp_path / "export" / "adapter")
        peft_logits = adapted.eval()(input_ids=ids).logits
    torch.testing.assert_close(hf, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(peft_logits, want, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert not any("lora" in k for k in model.from_pretrained(tmp_path / "export").state_dict())


def lora_recipe(tmp, steps: int):
    data = {"stage": "grpo", "grpo": {
        "init_from": str(make_policy(tmp)), "data": [{"source": str(write_prompts(tmp / "prompts.jsonl"))}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}],
        "steps": steps, "prompts_per_step": 4, "group_size": 3, "beta": 0.04, "seed": 3,
        "sampling": {"temperature": 1.0, "max_tokens": 8}, "save_every": 2, "keep_last": 2,
        "lora": {"r": 4, "alpha": 8},
        "engine": {"cluster": {"num_cpus": 2, "rollout_num_cpus": 1, "train_num_cpus": 1},
                   "rollout": {"backend": "native"}, "optim": {"lr": 1e-2, "warmup_steps": 3}}}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_kill_and_resume_with_lora_matches_uninterrupted(tmp_path):
    steps = 3
    path = lora_recipe(tmp_path, steps)
    full = align("grpo", str(path), "-o", str(tmp_path / "full"))
    assert full.wait(timeout=600) == 0, full.stderr.read().decode()[-2000:]
    kill_after_checkpoint_then_resume(path, tmp_path / "killed", step=2)
    assert_same_metrics(tmp_path / "full", tmp_path / "killed", steps)

    run = tmp_path / "full"
    ckpt = run / "checkpoints" / f"step-{steps}" / "engine"
    assert (ckpt / "adapter.safetensors").is_file() and not (ckpt / "model.safetensors").exists()   # adapters only
    policy_bytes = sum(p.numel() * 4 for p in model.from_pretrained(tmp_path / "policy").parameters())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["refit/bytes"] < policy_bytes / 4 for r in rows)          # adapter-only refit (native)
    assert (run / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "model" / "model.safetensors").is_file()


def test_align_plan_shows_the_reference_saving():
    from align.plan import format_plan, make_plan
    from align.recipe import load_recipe
    from tests.test_recipes import REPO

    full = load_recipe(REPO / "recipes" / "v2_lite_8gpu.yaml", ["grpo.init_from=v2-lite"]).grpo
    with_lora = GRPOConfig.model_validate({**full.model_dump(), "lora": {"r": 8, "alpha": 16}})
    a, b = make_plan(full), make_plan(with_lora)
    A = lora.count_for(model.make_config("v2-lite"), with_lora.lora)
    assert 0 < A < a.params / 100
    assert a.rank["reference"] == pytest.approx(a.params * 4 / 8) and b.rank["reference"] == 0   # 8 fsdp2 ranks
    assert b.reference_saved == pytest.approx(a.rank["reference"])
    assert b.rank["grads"] == pytest.approx(4 * A / 8) and b.rank["optimizer"] == pytest.approx(8 * A / 8)
    saved = a.rank["reference"] + 12 * (a.params - A) / 8                 # the recipe offloads all of it to host
    assert a.host_per_rank - b.host_per_rank == pytest.approx(saved - 4 * A / 8)
    assert "reference = the base with adapters off" in format_plan(b)


def test_gradient_checkpointing_with_adapters_gives_the_same_update():
    from tests.fsdp_fixture import kl_loss, tiny_net

    out = []
    for ckpt in (False, True):
        w = TrainWorker(tiny_net, tiny_net, OptimConfig(lr=0.05, eps=1.0),
                        TrainConfig(lora=LoraConfig(r=2, alpha=4), reference=True, gradient_checkpointing=ckpt))
        for s in range(2):
            b = batch(s)
            b["ref_logp"] = w.compute_logprobs(b, "ref")
            w.train_step(b, kl_loss)
        out.append(dict(lora.adapter_state(w.unwrapped)))
    assert out[0].keys() == out[1].keys() and len(out[0]) > 0
    for k in out[0]:
        torch.testing.assert_close(out[1][k], out[0][k], atol=1e-6, rtol=0)

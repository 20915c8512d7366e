"""`align grpo` with fsdp2 + expert parallelism (ep_size 2) + token-budget packing on 2 training ranks exports
the same weights after 3 steps as the 1-rank run (no sharding, padded rows): fp32, 1e-4. Through Ray."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import yaml

import model
from tests.grpo_fixture import make_policy, write_prompts
from tests.test_resume import align

STEPS = 3


def recipe(tmp: Path, train: dict) -> Path:
    data = {"stage": "grpo", "grpo": {
        "init_from": str(make_policy(tmp)), "data": [{"source": str(write_prompts(tmp / "prompts.jsonl"))}],
        "rewards": [{"spec": "tests.grpo_fixture:brevity"}],
        "steps": STEPS, "prompts_per_step": 2, "group_size": 3, "beta": 0.04, "seed": 3, "capacity_factor": 1.5,
        "sampling": {"temperature": 1.0, "max_tokens": 8}, "save_every": STEPS,
        "engine": {"cluster": {"num_cpus": 2, "rollout_num_cpus": 1, "train_num_cpus": 1,
                               "node_ip_address": "127.0.0.2"},
                   "rollout": {"backend": "native"}, "optim": {"lr": 1e-2, "max_grad_norm": 0.5}, "train": train}}}
    path = tmp / "grpo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def exported(run: Path) -> dict[str, np.ndarray]:
    net = model.from_pretrained(run / "model")
    return {n: t.numpy() for n, t in model.to_checkpoint_tensors(net.state_dict())}


def test_ep_packed_two_ranks_export_what_one_rank_exports(tmp_path):
    runs = {"one": {"world_size": 1},
            "ep": {"world_size": 2, "sharding": "fsdp2", "ep_size": 2, "micro_batch_tokens": 40}}
    for name, train in runs.items():              # one after the other: two local Rays starting at once race for ports
        (tmp_path / name).mkdir()
        p = align("grpo", str(recipe(tmp_path / name, train)), "-o", str(tmp_path / name / "run"))
        try:
            assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-3000:]
        finally:
            if p.poll() is None:                  # hung: end its process group
                os.killpg(p.pid, signal.SIGKILL)
    assert (tmp_path / "ep" / "run" / "checkpoints" / f"step-{STEPS}" / "engine" / "dcp").is_dir()   # sharded
    one, ep = exported(tmp_path / "one" / "run"), exported(tmp_path / "ep" / "run")
    start = {n: t.numpy() for n, t in model.to_checkpoint_tensors(
        model.from_pretrained(tmp_path / "one" / "policy").state_dict())}
    assert one.keys() == ep.keys() and "model.layers.1.mlp.experts.3.gate_proj.weight" in one
    for n in one:
        np.testing.assert_allclose(ep[n], one[n], atol=1e-4, rtol=0, err_msg=n)
    assert max(np.abs(one[n] - start[n]).max() for n in one) > 1e-3         # 3 steps did move the weights

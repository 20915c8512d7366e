"""`align grpo` with fsdp2 + expert parallelism (ep_size 2) + token-budget packing on 2 training ranks exports
the same weights after 3 steps as the 1-rank run (no sharding, padded rows): fp32, 1e-4. Through Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

import model
from tests.grpo_fixture import make_policy, write_prompts
from tests.test_resume import REPO

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
    procs = {}
    for name, train in runs.items():                        # both at once: Ray's start-up overlaps
        (tmp_path / name).mkdir()
        log = open(tmp_path / name / "stderr.log", "wb")
        procs[name] = subprocess.Popen([sys.executable, "-m", "align.cli", "grpo", str(recipe(tmp_path / name, train)),
                                        "-o", str(tmp_path / name / "run")], cwd=REPO, stdout=subprocess.DEVNULL,
                                       stderr=log, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        for name, p in procs.items():
            assert p.wait(timeout=600) == 0, (tmp_path / name / "stderr.log").read_text()[-3000:]
    finally:
        for p in procs.values():                            # a failed or hung run: end its process group
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert (tmp_path / "ep" / "run" / "checkpoints" / f"step-{STEPS}" / "engine" / "dcp").is_dir()   # sharded
    one, ep = exported(tmp_path / "one" / "run"), exported(tmp_path / "ep" / "run")
    start = {n: t.numpy() for n, t in model.to_checkpoint_tensors(
        model.from_pretrained(tmp_path / "one" / "policy").state_dict())}
    assert one.keys() == ep.keys() and "model.layers.1.mlp.experts.3.gate_proj.weight" in one
    for n in one:
        np.testing.assert_allclose(ep[n], one[n], atol=1e-4, rtol=0, err_msg=n)
    assert max(np.abs(one[n] - start[n]).max() for n in one) > 1e-3         # 3 steps did move the weights

"""Ray clusters the engine starts or joins: a private local Ray in the run dir, and a real two-node cluster.

Two-node: split placement must put rollout and training on different nodes.

`ray start --head` (rollout_node resource) + `ray start --address` (train_node resource), each in its
own session so teardown signals exactly the processes this test started (no `ray stop`, which kills
every Ray process on the machine by name). Addresses are 127.0.0.2: Ray rewrites 127.0.0.1 to the
host's address, any other loopback address keeps all traffic on lo. The driver runs in a subprocess
so its Ray and auth state (a private token) cannot leak into other tests.
"""

from __future__ import annotations

import json
import os
import math
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_engine_standin import save_tiny_checkpoint  # noqa: E402

from engine.cluster import MAX_TEMP_DIR_LEN, Cluster  # noqa: E402
from engine.config import ClusterConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
IP = "127.0.0.2"

DRIVER = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_engine_standin import HFGenerateRollout, register_for_ray, tiny_policy, weighted_nll
    from engine.config import ClusterConfig, OptimConfig, RolloutConfig, TrainConfig
    from engine.driver import HybridEngine
    from engine.sampling import SamplingConfig
    import ray

    register_for_ray()
    cluster = ClusterConfig(address={address!r}, node_ip_address={ip!r}, placement="split",
                            rollout_resources={{"rollout_node": 1}}, train_resources={{"train_node": 1}},
                            startup_timeout_s=120, call_timeout_s=120)
    with HybridEngine(cluster, RolloutConfig(), OptimConfig(lr=1e-2), TrainConfig(), {ckpt!r}, {run!r},
                      model_factory=tiny_policy, rollout_backend=HFGenerateRollout) as eng:
        nodes = {{n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}}
        prompts = [[1, 5, 9, 11], [1, 7, 7, 3]]
        rollouts = eng.generate(prompts, SamplingConfig(n=2, max_tokens=5, seed=0))
        ids = np.array([r.prompt_token_ids + r.token_ids for r in rollouts])
        gap_before = float(np.abs(eng.compute_logprobs({{"input_ids": ids}})[:, 3:]
                                  - np.array([r.logprobs for r in rollouts])).max())
        mask = np.zeros_like(ids); mask[:, 4:] = 1
        batch = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask,
                  "weight": np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32)}}
        metrics = eng.train_step(batch, weighted_nll)
        stats = eng.sync_weights()
        greedy = eng.generate(prompts, SamplingConfig(n=1, temperature=0.0, max_tokens=5))
        gids = np.array([r.prompt_token_ids + r.token_ids for r in greedy])
        trainer = eng.compute_logprobs({{"input_ids": gids}})[:, 3:]
        gap = float(np.abs(trainer - np.array([r.logprobs for r in greedy])).max())
        pids = [eng.rollout_info["pid"]] + [i["pid"] for i in eng.worker_info]
        print("RESULT " + json.dumps({{"node_ids": eng.node_ids(), "nodes": nodes, "loss": metrics["loss"],
                                       "tensors": stats.num_tensors, "bytes": stats.bytes, "gap": gap,
                                       "gap_before": gap_before,
                                       "pids": pids}}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((IP, 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """Every listening port explicit and free, so this cluster never collides with another Ray on the host."""
    out = []
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
        out += [flag, str(_free_port())]
    return out


def _session_pids(sid: int) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(p.name))
    return pids


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` (it stops its own children), then SIGKILL whatever is left in its session."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        for pid in _session_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_split_placement_on_two_nodes_runs_a_step(tmp_path):
    temp = Path(f"/tmp/da-mn-{secrets.token_hex(4)}")           # short: Ray's unix socket path limit
    temp.mkdir()
    (temp / "token").write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "token"),
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    gcs = _free_port()
    common = ["--node-ip-address", IP, "--num-cpus", "1", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats", "--block"]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(subprocess.Popen(
            [RAY, "start", "--head", "--port", str(gcs), "--temp-dir", str(temp), "--include-dashboard", "false",
             "--dashboard-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
             "--resources", json.dumps({"rollout_node": 1}), *_ports(), *common],
            env=env, start_new_session=True, stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((IP, gcs), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and procs[0].poll() is None, (temp / "head.log").read_text()
                time.sleep(0.5)
        procs.append(subprocess.Popen(
            [RAY, "start", "--address", f"{IP}:{gcs}", "--resources", json.dumps({"train_node": 1}),
             *_ports(), *common],
            env=env, start_new_session=True, stdout=open(temp / "worker.log", "w"), stderr=subprocess.STDOUT))

        ckpt = save_tiny_checkpoint(tmp_path / "ckpt", seed=1)
        script = tmp_path / "driver.py"
        script.write_text(DRIVER.format(tests=str(Path(__file__).resolve().parent), address=f"{IP}:{gcs}", ip=IP,
                                        ckpt=str(ckpt), run=str(tmp_path / "run")))
        run = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
        assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-3000:]
        res = json.loads(lines[-1][len("RESULT "):])
    finally:
        _stop(procs)
        leftovers = [pid for p in procs for pid in _session_pids(p.pid)]
        shutil.rmtree(temp, ignore_errors=True)
    assert leftovers == [], f"processes left behind: {leftovers}"

    rollout_node, train_node = res["node_ids"]["rollout"], res["node_ids"]["train"][0]
    assert rollout_node != train_node
    assert "rollout_node" in res["nodes"][rollout_node] and "train_node" in res["nodes"][train_node]
    assert res["tensors"] > 0 and res["bytes"] > 0 and math.isfinite(res["loss"])
    assert res["gap_before"] > 1e-2                             # the rollout node started from other weights
    assert res["gap"] < 1e-4                                    # refit made them the trainer's
    assert not any(Path(f"/proc/{pid}").exists() for pid in res["pids"])


def test_local_cluster_lives_in_the_run_dir_and_shuts_down(tmp_path):
    import ray

    @ray.remote
    class Probe:
        def pid(self) -> int:
            return os.getpid()

        def shutdown(self) -> None:
            pass

    run_dir = tmp_path / "run"
    assert len(str(run_dir / "ray")) > MAX_TEMP_DIR_LEN             # pytest's tmp paths are too long: fallback
    cluster = Cluster(ClusterConfig(num_cpus=2, node_ip_address=IP, object_store_memory=80 * 2**20), run_dir, 1)
    temp = (run_dir / "ray").resolve()
    try:
        assert ray.is_initialized() and cluster.owns_ray
        assert (run_dir / "ray").is_symlink() and str(temp).startswith("/tmp/deepalign-ray-")
        assert any(temp.glob("session_*/sockets"))                   # Ray's session lives there
        during = signal.getsignal(signal.SIGTERM)
        assert "Cluster" in during.__qualname__                      # SIGTERM now unwinds to shutdown
        probe = cluster.track(Probe.options(**cluster.rollout_options()).remote())
        pid = ray.get(probe.pid.remote(), timeout=120)
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert not ray.is_initialized()
    assert signal.getsignal(signal.SIGTERM) is not during            # our handler is gone again
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]

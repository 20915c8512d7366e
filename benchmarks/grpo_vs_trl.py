"""GRPO end to end: deepalign (vLLM rollout, colocated, via run_grpo) vs TRL's GRPOTrainer, same task.

Same checkpoint (a random `tiny` or `100m` network with a local tokenizer), same 16 prompts, group
size, completion length, sampling, learning rate, beta, clip, loss aggregation and number of steps;
the reward is `brevity` or `sevens` (benchmarks/_common.py). Each run is a fresh subprocess (so peak
RSS and thread settings do not leak between runs) and the frameworks alternate, `--repeats` times.
TRL trains transformers' DeepseekV2ForCausalLM (what a TRL user would load) and samples with
transformers' `generate`: TRL's vLLM colocate mode starts on CPU but fails at its first weight sync
(see benchmarks/README.md).

Reported per framework (median over repeats): per-step wall time split rollout / reward / train /
refit (steady state: step 1, which pays warm-ups, is left out); tokens/s over those steps and end to
end (process start to exit, our evaluation excluded); start-up time; peak RSS of the run's process
tree (driver + Ray actors + Ray daemons); the training reward at step 1 and at the last step; and the
reward of the final model under one shared evaluator (transformers sampling at T=1, fixed seed).
--profile-step K adds one extra run per framework with py-spy on every process during step K.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--size tiny] [--steps 6] [--repeats 2] [--reward brevity]
        [--prompts-per-step 4] [--group-size 8] [--max-tokens 16] [--lr 5e-3] [--beta 0.04]
        [--deepalign-omp-threads N] [--trl-gradient-checkpointing] [--profile-step K] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import REWARDS, TreeRSS, machine_line, make_checkpoint, median, param_summary, table  # noqa: E402

FRAMEWORKS = ("deepalign", "trl")
PHASES = ("rollout", "reward", "train", "refit")


# ----------------------------------------------------------------------------------------- shared
def write_prompts(path: Path, n: int = 16) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Count to {i % 7 + 2}:"}) + "\n")
    return path


@torch.no_grad()
def eval_reward(model_dir: Path, prompts_file: Path, reward: str, samples: int, max_tokens: int,
                seed: int = 1234) -> float:
    """Mean reward of `samples` completions per prompt, sampled at T=1 by transformers: one evaluator for both."""
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    net = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                     tokenize=False) for r in rows]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    torch.manual_seed(seed)
    out = net.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                       num_return_sequences=samples, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = REWARDS[reward]([r["prompt"] for r in rows for _ in range(samples)], completions)
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------- children
def run_deepalign(a: argparse.Namespace, work: Path) -> dict:
    import align.grpo.loop as gt
    from align.data.loading import DataSource
    from align.grpo.config import GRPOConfig
    from engine.config import ClusterConfig, EngineConfig, OptimConfig, RolloutConfig
    from engine.sampling import SamplingConfig
    from rewards.combine import RewardComponent

    rollout_kwargs = dict(max_model_len=256, kv_cache_gib=1) if a.deepalign_backend == "vllm" else {}
    cfg = GRPOConfig(
        init_from=str(a.ckpt), data=[DataSource(source=str(a.prompts_file))],
        rewards=[RewardComponent(spec=f"_common:{a.reward}")], steps=a.steps, prompts_per_step=a.prompts_per_step,
        group_size=a.group_size, beta=a.beta, clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean",
        advantage_scale="group", seed=0, sampling=SamplingConfig(temperature=1.0, max_tokens=a.max_tokens),
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, rollout_num_cpus=2, train_num_cpus=2),  # one 2-CPU bundle
                            rollout=RolloutConfig(backend=a.deepalign_backend, kwargs=rollout_kwargs),
                            optim=OptimConfig(lr=a.lr, max_grad_norm=1.0)))
    if a.profile_step:
        gt.grpo_step = profiled(gt.grpo_step, a.profile_step, work)
    import engine.driver
    init, t_init = engine.driver.HybridEngine.__init__, []

    def timed_init(self, *args, **kwargs):            # Ray + rollout actor (vLLM) + training actor start-up
        t = time.perf_counter()
        init(self, *args, **kwargs)
        t_init.append(time.perf_counter() - t)
    engine.driver.HybridEngine.__init__ = timed_init
    t0 = time.perf_counter()
    gt.run_grpo(cfg, work / "run")
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [{"rollout": r["time/rollout"], "reward": r["time/reward"], "train": r["time/train"],
              "refit": r["time/refit"], "step": r["time/step"], "tokens": r["tokens/generated"],
              "reward_mean": r["reward/total_mean"]} for r in recs]
    return {"wall": wall, "t_init": t_init[0], "steps": steps, "model_dir": str(work / "run" / "model")}


class Spy:
    """py-spy sampling a set of processes (by pid) at 100 Hz until stopped: raw collapsed stacks per process."""

    def __init__(self, targets: dict[str, int], out: Path, prefix: str):
        exe = str(Path(sys.executable).parent / "py-spy")
        self.procs = [subprocess.Popen([exe, "record", "-p", str(pid), "-r", "100", "--format", "raw", "-o",
                                        str(out / f"profile-{prefix}-{role}.txt")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for role, pid in targets.items()]
        time.sleep(1.0)                                      # let py-spy attach before the step starts

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)                     # py-spy writes its output on SIGINT
        for p in self.procs:
            p.wait(timeout=120)


def profiled(step_fn, which: int, work: Path):
    """Wrap grpo_step: during step `which` (1-based) py-spy samples the driver and every Ray actor of the run."""
    import psutil

    from _common import process_role
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] != which:
            return step_fn(*args, **kwargs)
        me = psutil.Process()
        targets = {"driver": me.pid}
        for p in me.children(recursive=True):
            if process_role(p) in ("RolloutWorker", "TrainWorker"):
                targets[process_role(p)] = p.pid
        spy = Spy(targets, work, "deepalign")
        try:
            return step_fn(*args, **kwargs)
        finally:
            spy.stop()
    return wrapper


def run_trl(a: argparse.Namespace, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.ckpt)
    net = DeepseekV2ForCausalLM.from_pretrained(a.ckpt, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(a.prompts_file).read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    per_step: list[dict] = []

    def reward(prompts, completions, completion_ids, **kw) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = REWARDS[a.reward](prompts, texts)
        per_step[-1].update(tokens=float(sum(len(c) for c in completion_ids)), reward_mean=float(np.mean(scores)))
        return scores

    def timed(fn, key: str):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                per_step[-1][key] = per_step[-1].get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    class StepClock(TrainerCallback):
        spy = None

        def on_step_begin(self, args, state, control, **kw):
            if len(per_step) + 1 == a.profile_step:
                self.spy = Spy({"driver": os.getpid()}, work, "trl")
            per_step.append({"t0": time.perf_counter()})

        def on_step_end(self, args, state, control, **kw):
            per_step[-1]["step"] = time.perf_counter() - per_step[-1].pop("t0")
            if self.spy is not None:
                self.spy.stop()
                self.spy = None

    args = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, bf16=False, seed=0, max_steps=a.steps,
        per_device_train_batch_size=a.prompts_per_step * a.group_size, num_generations=a.group_size,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=a.max_tokens,
        temperature=1.0, top_k=0, top_p=1.0, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=a.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=a.trl_gradient_checkpointing)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=net, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[StepClock()])
    t_init = time.perf_counter() - t0
    # TRL times none of these phases on the transformers path: wrap its own methods to split the step.
    trainer._generate_single_turn = timed(trainer._generate_single_turn, "rollout")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
    trainer.train()
    trainer.save_model(str(work / "model"))
    tok.save_pretrained(str(work / "model"))
    wall = time.perf_counter() - t0
    for s in per_step:                 # train = the rest of the step (ref log-probs, forward/backward, AdamW)
        s["train"] = s["step"] - s.get("rollout", 0.0) - s.get("reward", 0.0)
        s["refit"] = 0.0               # the policy generates itself: no weight transfer
    return {"wall": wall, "t_init": t_init, "steps": per_step, "model_dir": str(work / "model")}


def child_main(a: argparse.Namespace) -> None:
    import psutil

    # Interpreter start -> here: python, torch and this script's imports (the frameworks' own come in run_*).
    t_imports = time.time() - psutil.Process().create_time()
    work = Path(a.work)
    torch.manual_seed(0)
    out = run_deepalign(a, work) if a.child == "deepalign" else run_trl(a, work)
    out["t_imports"] = t_imports
    c0 = time.process_time()
    out["eval_reward"] = eval_reward(Path(out["model_dir"]), Path(a.prompts_file), a.reward, a.eval_samples,
                                     a.max_tokens)
    out["eval_cpu_seconds"] = time.process_time() - c0
    out["driver_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["threads"] = torch.get_num_threads()
    (work / "result.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent
def launch(fw: str, a: argparse.Namespace, work: Path, profile_step: int = 0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", fw, "--work", str(work), "--ckpt", str(a.ckpt),
           "--prompts-file", str(a.prompts_file), "--steps", str(a.steps), "--prompts-per-step",
           str(a.prompts_per_step), "--group-size", str(a.group_size), "--max-tokens", str(a.max_tokens),
           "--lr", str(a.lr), "--beta", str(a.beta), "--eval-samples", str(a.eval_samples),
           "--reward", a.reward, "--profile-step", str(profile_step), "--deepalign-backend", a.deepalign_backend]
    cmd += ["--trl-gradient-checkpointing"] * a.trl_gradient_checkpointing
    env = dict(os.environ)
    if fw == "deepalign" and a.deepalign_omp_threads:
        env["OMP_NUM_THREADS"] = str(a.deepalign_omp_threads)   # inherited by Ray and its actors
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        with TreeRSS(proc.pid) as rss:
            code = proc.wait()
    if code != 0 or not (work / "result.json").exists():
        tail = (work / "log.txt").read_text().splitlines()[-25:]
        raise SystemExit(f"{fw} run failed (exit {code}); last lines of {work / 'log.txt'}:\n" + "\n".join(tail))
    res = json.loads((work / "result.json").read_text())
    res["peak_rss"], res["peak_rss_by_role"] = rss.peak_total, rss.peak_by_role
    res["cpu_seconds"] = rss.total_cpu_seconds                 # includes our evaluation at the end
    return res


def summarize_run(res: dict) -> dict:
    steady = res["steps"][1:] or res["steps"]
    s = {p: float(np.mean([x.get(p, 0.0) for x in steady])) for p in (*PHASES, "step")}
    s["tok_s_steady"] = sum(x["tokens"] for x in steady) / sum(x["step"] for x in steady)
    e2e = res["t_imports"] + res["wall"]            # the user's command, minus our evaluation afterwards
    s["tok_s_e2e"] = sum(x["tokens"] for x in res["steps"]) / e2e
    s["t_init"] = res["t_imports"] + res["t_init"]
    s["t_end"] = res["wall"] - res["t_init"] - sum(x["step"] for x in res["steps"])
    s["reward_last"] = res["steps"][-1]["reward_mean"]
    s["reward_first"] = res["steps"][0]["reward_mean"]
    s["eval_reward"], s["peak_rss_mb"] = res["eval_reward"], res["peak_rss"] / 2**20
    s["cpu_s"] = res["cpu_seconds"] - res["eval_cpu_seconds"]
    return s


# Frames that only say "somebody is waiting or dispatching": left out of the profile listing.
PLUMBING = ("ray/", "threading.py", "tracing_helper.py", "torch/nn/modules/module.py", "torch/utils/_contextlib.py",
            "contextlib.py", "concurrent/", "asyncio/", "selectors.py", "queue.py", "<module>", "grpo_vs_trl.py",
            "runpy.py", "trainer.py", "accelerate/", "trl/extras/profiling.py", "site-packages/tqdm")
# Leaves py-spy counts as busy although the thread only waits (condition variables, Ray's poll loops).
IDLE_LEAVES = ("(threading.py)", "(ray/_private/worker.py)", "(queue.py)", "(selectors.py)")


def summarize_profiles(work: Path, top: int = 12) -> str:
    """py-spy raw stacks -> per process: active CPU seconds, top frames by inclusive share, top leaf (self) frames."""
    def name(frame: str) -> str:                     # "fn (pkg/file.py:123)" -> "fn (pkg/file.py)"
        fn, _, where = frame.rpartition(" (")
        return f"{fn} ({where.rsplit(':', 1)[0]})"

    lines = []
    for f in sorted(work.glob("profile-*.txt")):
        incl: dict[str, int] = {}
        leaf: dict[str, int] = {}
        total = 0
        for line in f.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit() or not stack:
                continue
            n, frames = int(count), [name(fr) for fr in stack.split(";") if fr]
            if frames[-1].endswith(IDLE_LEAVES):
                continue
            total += n
            leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
            for fr in set(frames):
                if not any(p in fr for p in PLUMBING):
                    incl[fr] = incl.get(fr, 0) + n
        pct = lambda n: f"{100 * n / max(total, 1):5.1f}%"  # noqa: E731
        lines.append(f"{f.stem.removeprefix('profile-')}: {total / 100:.1f} s busy (py-spy at 100 Hz, waits left out)")
        lines += [f"  {pct(n)}  {fr}" for fr, n in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
        lines.append("  self time:")
        lines += [f"  {pct(n)}  {fr}" for fr, n in sorted(leaf.items(), key=lambda kv: -kv[1])[:top // 2]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "100m"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--reward", default="brevity", choices=sorted(REWARDS))
    ap.add_argument("--eval-samples", type=int, default=8, help="completions per prompt for the final-model reward")
    ap.add_argument("--deepalign-backend", default="vllm", choices=["vllm", "native"],
                    help="deepalign's rollout backend (the comparison asked for is vLLM)")
    ap.add_argument("--deepalign-omp-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for deepalign's Ray actors (0 = Ray's default: 1 per fractional-CPU actor)")
    ap.add_argument("--trl-gradient-checkpointing", action="store_true",
                    help="TRL's default; off here (deepalign does not checkpoint and memory is no issue at these sizes)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="after the timed runs, one extra run per framework with py-spy on every process during step K")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (logs, metrics, profiles)")
    ap.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_main(a)

    print(machine_line(), flush=True)
    root = Path(tempfile.mkdtemp(prefix="grpo-bench-", dir="/tmp"))
    a.ckpt = make_checkpoint(root, a.size, seed=0, with_tokenizer=True)
    a.prompts_file = write_prompts(root / "prompts.jsonl")
    print(f"[{a.size}] {param_summary(a.ckpt)}; {a.steps} steps x {a.prompts_per_step} prompts x G={a.group_size}, "
          f"{a.max_tokens} new tokens, lr {a.lr:g}, beta {a.beta:g}; runs in {root}", flush=True)
    base = eval_reward(a.ckpt, a.prompts_file, a.reward, a.eval_samples, a.max_tokens)
    print(f"initial model: eval reward {base:.3f}", flush=True)
    runs: dict[str, list[dict]] = {fw: [] for fw in a.frameworks}
    for rep in range(a.repeats):
        order = a.frameworks if rep % 2 == 0 else a.frameworks[::-1]
        for fw in order:
            res = launch(fw, a, root / f"{fw}-{rep}")
            s = summarize_run(res)
            runs[fw].append(s)
            print(f"  repeat {rep + 1} {fw:9}: wall {res['wall']:.0f} s, step {s['step']:.2f} s, "
                  f"{s['tok_s_steady']:.0f} tok/s steady, reward {s['reward_first']:.2f} -> {s['reward_last']:.2f}, "
                  f"eval {s['eval_reward']:.2f}, peak RSS {s['peak_rss_mb']:.0f} MiB "
                  f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in sorted(res['peak_rss_by_role'].items()) if v)}), "
                  f"driver threads {res['threads']}", flush=True)

    med = {fw: {k: median([r[k] for r in rs]) for k in rs[0]} for fw, rs in runs.items()}
    keys = [("rollout", "rollout s/step"), ("reward", "reward s/step"), ("train", "train s/step"),
            ("refit", "refit s/step"), ("step", "step s"), ("tok_s_steady", "tok/s steady"),
            ("tok_s_e2e", "tok/s end to end"), ("t_init", "start-up s"), ("t_end", "other s (data, save, exit)"),
            ("cpu_s", "CPU s, whole run (all procs)"), ("peak_rss_mb", "peak RSS MiB"), ("reward_first", "reward step 1"),
            ("reward_last", f"reward step {a.steps}"), ("eval_reward", "eval reward (final model)")]
    rows = [[label] + [med[fw][k] for fw in a.frameworks] for k, label in keys]
    headers = ["median over repeats"] + list(a.frameworks)
    if set(FRAMEWORKS) <= set(a.frameworks):
        headers.append("deepalign/trl")
        for row, (k, _) in zip(rows, keys):
            row.append(med["deepalign"][k] / med["trl"][k] if med["trl"][k] else float("nan"))
    print(f"\n{a.steps} steps, {a.repeats} repeats; initial-model eval reward {base:.3f}\n" + table(headers, rows))
    if a.profile_step:                               # separate runs: py-spy slows the step it samples
        for fw in a.frameworks:
            res = launch(fw, a, root / f"{fw}-profile", profile_step=a.profile_step)
            st = res["steps"][a.profile_step - 1]
            print(f"\npy-spy, {fw} step {a.profile_step} (an extra run): step {st['step']:.2f} s = "
                  + ", ".join(f"{p} {st.get(p, 0.0):.2f}" for p in PHASES))
            print(summarize_profiles(root / f"{fw}-profile"))
    print(machine_line())
    if not a.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

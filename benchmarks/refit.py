"""Weight refit (trainer -> rollout engine) through HybridEngine.sync_weights: seconds and MB/s.

For each size x placement (colocated, split) x rollout backend (vllm, native) one engine is started
on a private local Ray, refits once to warm up, then `--repeats` times; the median is reported with
ratios vllm/native and split/colocated. Refits move float32 arrays in checkpoint naming, so bytes =
4 x parameters.

    .venv/bin/python benchmarks/refit.py [--sizes tiny 100m] [--placements colocated split]
                                         [--backends vllm native] [--repeats 5] [--bucket-mb 64]
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from _common import machine_line, make_checkpoint, median, param_summary, table  # noqa: E402
from engine.config import ClusterConfig, OptimConfig, RolloutConfig, TrainConfig  # noqa: E402
from engine.driver import EngineError, HybridEngine  # noqa: E402


def bench_one(path: Path, run_dir: Path, placement: str, backend: str, bucket_mb: float, repeats: int) -> dict:
    kwargs = dict(max_model_len=256, kv_cache_gib=1) if backend == "vllm" else {}
    t0 = time.perf_counter()
    with HybridEngine(ClusterConfig(placement=placement, rollout_num_cpus=1, train_num_cpus=1),
                      RolloutConfig(backend=backend, kwargs=kwargs, refit_bucket_mb=bucket_mb),
                      OptimConfig(), TrainConfig(), path, run_dir) as eng:
        startup = time.perf_counter() - t0
        eng.sync_weights()                                     # warm-up: first bucket shapes, lazy imports
        stats = [eng.sync_weights() for _ in range(repeats)]
    secs = [s.seconds for s in stats]
    print(f"  {placement:9} {backend:6} start-up {startup:5.1f} s  refits (s): "
          + " ".join(f"{s:.3f}" for s in secs), flush=True)
    mb = stats[0].bytes / 1e6
    return {"seconds": median(secs), "mb": mb, "mb_per_s": mb / median(secs), "buckets": stats[0].num_buckets,
            "tensors": stats[0].num_tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "100m"])
    ap.add_argument("--placements", nargs="+", default=["colocated", "split"], choices=["colocated", "split"])
    ap.add_argument("--backends", nargs="+", default=["vllm", "native"], choices=["vllm", "native"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine_line(), flush=True)
    results: dict[tuple[str, str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="refit-bench-", dir="/tmp") as d:
        # One private Ray for every engine below (HybridEngine reuses an initialised Ray).
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=str(Path(d) / "ray"),
                 logging_level=logging.WARNING)
        try:
            for size in args.sizes:
                path = make_checkpoint(Path(d), size)
                print(f"\n[{size}] {param_summary(path)}", flush=True)
                for placement in args.placements:
                    for backend in args.backends:
                        run_dir = Path(d) / f"run-{size}-{placement}-{backend}"
                        try:
                            results[size, placement, backend] = bench_one(path, run_dir, placement, backend,
                                                                          args.bucket_mb, args.repeats)
                        except (EngineError, ray.exceptions.RayError) as e:
                            # Say what broke, then measure the same refit as one bucket so the row is not empty.
                            print(f"  {placement:9} {backend:6} FAILED with {args.bucket_mb:g} MB buckets: "
                                  f"{str(e).strip().splitlines()[-1][:200]}", flush=True)
                            whole = 1 + 1.1 * sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
                            results[size, placement, backend + "*"] = bench_one(
                                path, Path(str(run_dir) + "-1bucket"), placement, backend, whole, args.repeats)
        finally:
            ray.shutdown()

    rows = [[size, p, b, r["mb"], r["tensors"], r["buckets"], r["seconds"] * 1e3, r["mb_per_s"]]
            for (size, p, b), r in results.items()]
    print(f"\nmedian of {args.repeats} refits (bucket {args.bucket_mb:g} MB)")
    print(table(["size", "placement", "backend", "MB", "tensors", "buckets", "ms", "MB/s"], rows))
    if any(b.endswith("*") for _, _, b in results):
        print("* failed with the bucket size asked for; measured as one bucket instead (see the FAILED line)")
    ratio_rows = []
    for size in args.sizes:
        def get(p: str, b: str) -> dict | None:
            return results.get((size, p, b)) or results.get((size, p, b + "*"))
        for p in args.placements:
            if get(p, "vllm") and get(p, "native"):
                ratio_rows.append([size, f"vllm/native time ({p})", get(p, "vllm")["seconds"] / get(p, "native")["seconds"]])
        for b in args.backends:
            if get("split", b) and get("colocated", b):
                ratio_rows.append([size, f"split/colocated time ({b})",
                                   get("split", b)["seconds"] / get("colocated", b)["seconds"]])
    if ratio_rows:
        print("\n" + table(["size", "ratio", "value"], ratio_rows))
    print(machine_line())


if __name__ == "__main__":
    main()

"""Sweep overhead: what Ray Tune, checkpointing and MLflow tracking add to the trainings.

    python -m benchmarks.sweep_overhead [--quick]

Runs one real sweep (`pipeline.sweep.run.run_sweep`: Ray local, MLflow on SQLite, checkpoints,
results/sweep.csv) in a temporary project at full packing: as many concurrent one-CPU trials as
Ray has CPUs (slots), and twice as many trials as slots, so every slot trains two trials in a
row. The figure is

    overhead = sweep wall time x slots / sum of the trials' training times

where a trial's training time is the sum of its epochs' `epoch_seconds` (the training steps and
the per-epoch test evaluation, as timed inside `echo.train.fit`). 1.0 would mean the slots did
nothing but train; everything else (worker start-up and imports, data loading, checkpoints,
result reporting, MLflow logging by the driver, the CSV) is what the ratio counts. The time to
start Ray itself (once per stage run) and to create the MLflow store (once per project; the
benchmark creates it before timing the sweep) are reported beside it, as is the machine's load,
since a shared machine's other work stretches every number. Trials are 300 epochs of the digits
MLP (about as long as 15 epochs of MNIST): long against the fixed per-slot start-up (worker
process, imports, data), which trials after the first on a slot reuse.
Target (issue 5): at most 1.15.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

QUICK_EPOCHS, FULL_EPOCHS = 10, 300


def measure_sweep_overhead(quick: bool, sweep_options: dict | None = None) -> dict:
    import ray
    from ray import tune

    from pipeline.config import Params
    from pipeline.mlflow_store import resolve_tracking_uri
    from pipeline.sweep.run import connect_ray, run_sweep
    from pipeline.sweep.tracking import SweepTracker
    from pipeline.records import ARTIFACT_DIR

    class EpochTimes(tune.Callback):
        def __init__(self):
            self.seconds: dict[str, float] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "epoch_seconds" in result:
                key = trial.config["trial_id"]
                self.seconds[key] = self.seconds.get(key, 0.0) + result["epoch_seconds"]

    epochs = QUICK_EPOCHS if quick else FULL_EPOCHS
    start = time.perf_counter()
    started = connect_ray()
    ray_start_s = time.perf_counter() - start
    slots = int(ray.available_resources().get("CPU", 1))
    betas = [round(0.25 * (i + 1), 2) for i in range(2 * slots)]
    params = Params.model_validate({
        "data": {"dataset": "digits"},
        "train": {"epochs": epochs, "batch_size": 100},
        "sweep": {"name": "overhead", "methods": ["echo"], "betas": betas, "archs": ["mlp"],
                  "latent_dims": [32], "max_concurrent": slots, "resources": {"cpu": 1},
                  **(sweep_options or {})},
        "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "overhead"},
    })
    times = EpochTimes()
    try:
        with tempfile.TemporaryDirectory(prefix="sweep-overhead-") as root:
            # A project's first sweep also creates the MLflow store (schema migrations, seconds):
            # a one-time cost, timed apart.
            start = time.perf_counter()
            SweepTracker(resolve_tracking_uri(params.tracking.uri, Path(root)),
                         params.tracking.experiment, "setup", "setup",
                         artifact_root=Path(root) / ARTIFACT_DIR).open()
            store_s = time.perf_counter() - start
            start = time.perf_counter()
            table = run_sweep(params, Path(root), callbacks=(times,), verbose=0)
            wall_s = time.perf_counter() - start
    finally:
        if started:
            ray.shutdown()
    train_s = sum(times.seconds.values())
    return {
        "overhead": round(wall_s * slots / train_s, 3),
        "wall_s": round(wall_s, 2),
        "train_s_sum": round(train_s, 2),
        "slots": slots,
        "trials": len(table),
        "completed": int((table["status"] == "completed").sum()),
        "epochs": epochs,
        "checkpoint_every": params.sweep.checkpoint_every,
        "ray_start_s": round(ray_start_s, 2),
        "mlflow_store_create_s": round(store_s, 2),
        "overhead_with_ray_start": round((wall_s + ray_start_s) * slots / train_s, 3),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "quick": quick,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_overhead",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_EPOCHS} epochs per trial instead of {FULL_EPOCHS}")
    args = parser.parse_args(argv)
    result = measure_sweep_overhead(args.quick)
    width = max(map(len, result))
    print("sweep overhead (wall x slots / sum of training time)")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value}")
    print(json.dumps({"sweep_overhead": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

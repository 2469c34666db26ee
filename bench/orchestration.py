"""Where a study's time goes on the embedded default: per cell, the driver's launch-to-result wall time against the
cell's own setup, training and evaluation seconds (all read back from MLflow), the training share of the cores'
time, and how long the CLI takes to answer. Everything is measured in one run, as ratios.

  python bench/orchestration.py --out bench/results/orchestration_2core.json        # the quickstart (~3 min)
  python bench/orchestration.py --study studies/upcycling.yaml --cores 2             # any study file
  python bench/orchestration.py --sweep-trials 0                                      # the study only

`ray_train_floor_s` is the same machine's wall time of a TorchTrainer.fit() over an empty train loop, measured in the
same run, one at a time and as many at a time as the study runs cells: the part of a cell's overhead that no Ray
Train run avoids.

The sweep part runs `moelab tune` on studies/sweep_quickstart.yaml with `--sweep-trials` trials and no early
stopping, so every trial trains the same steps: per trial, overhead = its slot of the sweep's wall time
(wall x concurrency / trials) - (setup + train + eval), which includes Tune's trial start that no MLflow run sees.

Per cell: overhead = cell_wall - (setup + train + eval): Ray Train's worker group start and teardown, imports in the
worker, checkpoint reports, MLflow round trips, the final measurements and artifacts. The cell logs two parts of it
itself: `worker_start` (its process's start to its function: Ray Train's worker setup and the imports) and `final`
(after the last step: cost and inference measurements, plots, artifacts). Cells run `max_concurrent_cells` at a time, so the cores' time is
study wall x cores, and `useful_share` = sum(setup + train + eval) / that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.moe_layer import emit  # noqa: E402


def timed(cmd: list[str], cwd: Path = REPO) -> float:
    began = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def cell_breakdown(workdir: Path, study_name: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study_name)
    rows = []
    for run in client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'"):
        m = run.data.metrics
        parts = {k: m.get(f"summary/{k}_seconds", float("nan"))
                 for k in ("cell_wall", "setup", "train", "eval", "worker_start", "final")}
        rows.append({"cell": run.data.tags["moelab.cell_id"], "router": run.data.tags["router"],
                     "model": run.data.tags["model"], **parts,
                     "overhead": parts["cell_wall"] - parts["setup"] - parts["train"] - parts["eval"]})
    return rows


def sweep_breakdown(trials: int, cores: int) -> dict:
    import yaml
    from mlflow.tracking import MlflowClient

    study = yaml.safe_load((REPO / "studies" / "sweep_quickstart.yaml").read_text())
    study["sweep"].update(num_samples=trials, scheduler="none")
    with tempfile.TemporaryDirectory() as tmp:
        path, workdir = Path(tmp) / "sweep.yaml", Path(tmp) / "work"
        path.write_text(yaml.safe_dump(study))
        wall = timed([sys.executable, "-m", "workflows.driver.cli", "tune", str(path), "--workdir", str(workdir)])
        client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        exp = client.get_experiment_by_name(study["name"])
        runs = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'trial'")
    useful = [sum(r.data.metrics.get(f"summary/{k}_seconds", float("nan")) for k in ("setup", "train", "eval"))
              for r in runs]
    slot = wall * study["resources"]["max_concurrent_cells"] / len(runs)
    return {"study": "sweep_quickstart.yaml", "trials": len(runs), "sweep_wall_s": wall,
            "trial_slot_s": slot, "overhead_per_trial_s": {"median": slot - statistics.median(useful)},
            "train_share": sum(r.data.metrics.get("summary/train_seconds", float("nan")) for r in runs) / (wall * cores),
            "useful_share": sum(useful) / (wall * cores)}


def _empty_train_loop(config: dict) -> None:
    import psutil
    import ray.train

    # as a cell's summary/worker_start_seconds: the worker process's start to the train function (Ray Train V2
    # keeps no metrics reported without a checkpoint, so it goes to a file)
    Path(config["worker_start_file"]).write_text(str(time.time() - psutil.Process().create_time()))
    ray.train.report({"step": 1})


def ray_train_floor(fits: int = 4, concurrencies: tuple[int, ...] = (1, 2)) -> dict:
    """Ray Train's own cost of one fit() on this machine: TorchTrainer runs of an empty train loop (one worker, one
    CPU, the driver's polling interval), one at a time and as many at a time as the quickstart runs cells. What a
    cell's overhead has beyond this is moelab's; this much no cell that is a Ray Train run avoids."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows.driver.ray_cluster import RAY_TRAIN_POLLING, init_ray

    def fit(name: str, storage: str) -> tuple[float, float]:
        """(wall, the worker's start to its train function)"""
        began = time.perf_counter()
        start_file = Path(storage) / f"{name}.worker_start"
        TorchTrainer(_empty_train_loop, train_loop_config={"worker_start_file": str(start_file)},
                     scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name=name, storage_path=storage)).fit()
        return time.perf_counter() - began, float(start_file.read_text())

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        init_ray(None)  # the Ray a study starts: local, dashboard on, the same runtime env
        try:
            os.environ.update(RAY_TRAIN_POLLING)  # Ray Train hands the driver's value on to its controller
            remote_fit = ray.remote(num_cpus=0)(fit)
            for concurrent in concurrencies:
                timings: list[tuple[float, float]] = []
                for first in range(0, fits, concurrent):
                    timings += ray.get([remote_fit.remote(f"floor{concurrent}_{i}", tmp)
                                        for i in range(first, first + concurrent)])
                walls = [wall for wall, _ in timings]
                out[f"{concurrent}_at_a_time"] = {"fits": fits, "median": statistics.median(walls),
                                                  "min": min(walls), "max": max(walls),
                                                  "worker_start_median": statistics.median(s for _, s in timings)}
        finally:
            ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--sweep-trials", type=int, default=4, help="trials of the sweep part (0: no sweep)")
    parser.add_argument("--out")
    args = parser.parse_args()
    moelab = [sys.executable, "-m", "workflows.driver.cli"]
    cli = {"help_s": timed([*moelab, "--help"]), "validate_s": timed([*moelab, "validate", args.study])}
    import yaml

    study = yaml.safe_load(Path(args.study).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "work"
        study_wall = timed([*moelab, "run", args.study, "--workdir", str(workdir)])
        rows = cell_breakdown(workdir, study["name"])
    useful = sum(r["setup"] + r["train"] + r["eval"] for r in rows)
    report = {
        "bench": "orchestration", "study": Path(args.study).name, "cores": args.cores, "cells": len(rows),
        "study_wall_s": study_wall, "cli": cli,
        "overhead_per_cell_s": {"median": statistics.median(r["overhead"] for r in rows),
                                "max": max(r["overhead"] for r in rows)},
        "setup_per_cell_s": {"median": statistics.median(r["setup"] for r in rows)},
        # inside the overhead, measured by the cell itself: its worker's start (Ray Train's worker setup + the
        # imports of the cell's code) and its final measurements and artifacts after the last step
        "worker_start_per_cell_s": {"median": statistics.median(r["worker_start"] for r in rows)},
        "final_per_cell_s": {"median": statistics.median(r["final"] for r in rows)},
        "train_share": sum(r["train"] for r in rows) / (study_wall * args.cores),
        "useful_share": useful / (study_wall * args.cores),
        "per_cell": rows,
    }
    concurrent = study.get("resources", {}).get("max_concurrent_cells", 1)
    report["ray_train_floor_s"] = ray_train_floor(concurrencies=tuple(sorted({1, concurrent})))
    floor = report["ray_train_floor_s"][f"{concurrent}_at_a_time"]["median"]
    report["overhead_beyond_floor_per_cell_s"] = {"median": report["overhead_per_cell_s"]["median"] - floor}
    # the cell's worker start beyond the empty loop's (the imports of the cell's code), and its final measurements
    floor_start = report["ray_train_floor_s"][f"{concurrent}_at_a_time"]["worker_start_median"]
    report["beyond_floor_parts_s"] = {
        "worker_start_beyond_floor": report["worker_start_per_cell_s"]["median"] - floor_start,
        "final": report["final_per_cell_s"]["median"]}
    if args.sweep_trials:
        report["sweep"] = sweep_breakdown(args.sweep_trials, args.cores)
    emit(report, args.out)


if __name__ == "__main__":
    main()

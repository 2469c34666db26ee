"""Where a study's time goes on the embedded default: per cell, the driver's launch-to-result wall time against the
cell's own setup, training and evaluation seconds (all read back from MLflow), the training share of the cores'
time, and how long the CLI takes to answer. Everything is measured in one run, as ratios.

  python bench/orchestration.py --out bench/results/orchestration_2core.json        # the quickstart (~3 min)
  python bench/orchestration.py --study studies/upcycling.yaml --cores 2             # any study file

Per cell: overhead = cell_wall - (setup + train + eval): Ray Train's worker group start and teardown, imports in the
worker, checkpoint reports, MLflow round trips. Cells run `max_concurrent_cells` at a time, so the cores' time is
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
        parts = {k: m.get(f"summary/{k}_seconds", float("nan")) for k in ("cell_wall", "setup", "train", "eval")}
        rows.append({"cell": run.data.tags["moelab.cell_id"], "router": run.data.tags["router"],
                     "model": run.data.tags["model"], **parts,
                     "overhead": parts["cell_wall"] - parts["setup"] - parts["train"] - parts["eval"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--out")
    args = parser.parse_args()
    moelab = [sys.executable, "-m", "workflows.driver.cli"]
    cli = {"help_s": timed([*moelab, "--help"]), "validate_s": timed([*moelab, "validate", args.study])}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "work"
        study_wall = timed([*moelab, "run", args.study, "--workdir", str(workdir)])
        import yaml

        rows = cell_breakdown(workdir, yaml.safe_load(Path(args.study).read_text())["name"])
    useful = sum(r["setup"] + r["train"] + r["eval"] for r in rows)
    report = {
        "bench": "orchestration", "study": Path(args.study).name, "cores": args.cores, "cells": len(rows),
        "study_wall_s": study_wall, "cli": cli,
        "overhead_per_cell_s": {"median": statistics.median(r["overhead"] for r in rows),
                                "max": max(r["overhead"] for r in rows)},
        "setup_per_cell_s": {"median": statistics.median(r["setup"] for r in rows)},
        "train_share": sum(r["train"] for r in rows) / (study_wall * args.cores),
        "useful_share": useful / (study_wall * args.cores),
        "per_cell": rows,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()

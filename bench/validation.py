"""How long `moelab validate` takes as a study grows: the quickstart's routers with 1,000 to 100,000 seeds (up to
400,000 cells), each timed in-process (read + YAML + schema + expansion into cells) and as the CLI a user runs.
Validation should stay linear in the cells: the JSON gives seconds per 100,000 cells at each size, from one run.

  python bench/validation.py --out bench/results/validation_cpu.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.moe_layer import emit  # noqa: E402


def study_with_seeds(seeds: int, folder: Path) -> Path:
    study = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    study["seeds"] = list(range(seeds))
    path = folder / f"seeds_{seeds}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def in_process_seconds(path: Path) -> tuple[float, int]:
    from workflows.study.cells import expand
    from workflows.study.loading import load_study

    began = time.perf_counter()
    cells = len(expand(load_study(path)))
    return time.perf_counter() - began, cells


def cli_seconds(path: Path) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "workflows.driver.cli", "validate", str(path)], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seeds in args.seeds:
            path = study_with_seeds(seeds, Path(tmp))
            seconds, cells = in_process_seconds(path)
            rows.append({"seeds": seeds, "cells": cells, "in_process_s": round(seconds, 3),
                         "cli_s": round(cli_seconds(path), 3),
                         "in_process_s_per_100k_cells": round(seconds / cells * 100_000, 3)})
    emit({"benchmark": "validation", "python": sys.version.split()[0], "sizes": rows}, args.out)


if __name__ == "__main__":
    main()

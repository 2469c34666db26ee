"""A finished cell's routing artifacts on its MLflow run: expert-usage and domain heatmaps, their CSVs,
co-activation matrices and the experts-per-token histogram."""
from __future__ import annotations

import tempfile
from pathlib import Path

from workflows.cell.worker import Worker
from workflows.study.cells import Cell


def block_stacks(cell: Cell, blocks: list[int]) -> dict[str, list[int]]:
    """Encoder and decoder MoE blocks get a heatmap each (block numbering of models/seq2seq.py); one otherwise."""
    encoder_layers = getattr(cell.model.resolved_options(), "encoder_layers", None)
    if encoder_layers is None:
        return {"": blocks}
    return {"encoder": [b for b in blocks if b < encoder_layers], "decoder": [b for b in blocks if b >= encoder_layers]}


def log_final_artifacts(w: Worker, cell: Cell, tables: dict[int, dict[str, list]], domains: list[str]) -> None:
    if not tables:
        return
    from workflows.figures import expert_usage_heatmap, heatmap  # matplotlib: loaded when a cell ends, not at start

    fractions = {i: t["expert_fraction"] for i, t in tables.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for stack, blocks in block_stacks(cell, sorted(fractions)).items():
            if blocks:
                name = f"expert_usage_{stack}" if stack else "expert_usage"
                png = expert_usage_heatmap({i: fractions[i] for i in blocks},
                                           f"{cell.router.display()} — eval expert usage {stack}".rstrip(),
                                           Path(tmp) / f"{name}.png")
                w.tracker.log_artifact(w.run_id, png, "routing")
        for i, t in sorted(tables.items()):
            if "domain_expert_share" in t:  # labelled data: which experts each domain's tokens go to
                png = heatmap(t["domain_expert_share"], domains, f"{cell.router.display()} — block {i} top-1 expert "
                              "by domain", "share of the domain's tokens", Path(tmp) / f"domain_expert_block{i}.png")
                w.tracker.log_artifact(w.run_id, png, "routing")
    rows = ["block," + ",".join(f"expert{e}" for e in range(len(next(iter(fractions.values())))))]
    rows += [f"{i}," + ",".join(f"{f:.6f}" for f in fr) for i, fr in sorted(fractions.items())]
    w.tracker.log_text(w.run_id, "\n".join(rows) + "\n", "routing/expert_usage.csv")
    for i, t in sorted(tables.items()):
        matrix = "\n".join(",".join(f"{v:.4f}" for v in row) for row in t["coactivation"])
        w.tracker.log_text(w.run_id, matrix + "\n", f"routing/coactivation_block{i}.csv")
    rows = ["block," + ",".join(f"{n}_experts" for n in range(len(next(iter(tables.values()))["experts_per_token_hist"])))]
    rows += [f"{i}," + ",".join(f"{h:.6f}" for h in t["experts_per_token_hist"]) for i, t in sorted(tables.items())]
    w.tracker.log_text(w.run_id, "\n".join(rows) + "\n", "routing/experts_per_token_hist.csv")

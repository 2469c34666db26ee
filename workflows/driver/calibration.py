"""`moelab calibrate`: the value of a trained dynamic router's knob at which the model spends a target number of
experts per token on the study's validation split (the matched-compute calibration of docs/claims.md).

A finished cell of that router is loaded into a one-process engine; each bisection step sets the knob in every MoE
block and runs the cell's own evaluation (the fixed evaluation set, the same `eval/moe/experts_per_token` and
`eval/loss` the cell logged), so the calibrated value and the loss at it are read exactly as the table reads them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TextIO

from workflows.driver.commands import study_or_exit, usable_workspace, use_threads
from workflows.study.errors import StudyError


@dataclass(frozen=True)
class CellCalibration:
    cell: str  # the cell's title: router / model / dataset / seed
    option: str
    trained_value: float  # the knob as the cell trained with it (the mean over its MoE layers)
    trained_experts_per_token: float
    trained_eval_loss: float
    value: float  # the calibrated knob
    experts_per_token: float
    eval_loss: float
    target: float
    evaluations: int

    def line(self) -> str:
        return (f"{self.cell}: {self.option} = {self.value:.6g} spends {self.experts_per_token:.3f} experts per token "
                f"(target {self.target:g}; {self.evaluations} evaluations), eval loss {self.eval_loss:.4f}; as "
                f"trained, {self.option} = {self.trained_value:g}: {self.trained_experts_per_token:.3f} experts per "
                f"token, eval loss {self.trained_eval_loss:.4f}")


def _knob_of(study, label: str):
    from moe_models.routers import ROUTERS

    labels = {entry.display(): entry for entry in study.routers}
    if label not in labels:
        raise StudyError("--router", [f"{label!r} is not a router of {study.name}; its routers: "
                                      f"{', '.join(labels)}"], "cannot calibrate")
    knob = ROUTERS.get(labels[label].name).Options.calibration_knob
    if knob is None:
        dynamic = [name for name in ROUTERS.names() if ROUTERS.get(name).Options.calibration_knob is not None]
        raise StudyError("--router", [f"{label!r} ({labels[label].name}) has no knob that sets its experts per token;"
                                      f" routers that do: {', '.join(dynamic)}"], "cannot calibrate")
    return knob


def calibrate_cell(study, ws, label: str, knob, target: float, seed: int | None, tolerance: float) -> CellCalibration:
    """`knob`: the router's, as `_knob_of` checked it."""
    from moe_models.routers.calibration import calibrate, CalibrationError, read_knob, set_knob
    from workflows.cell.evaluation import evaluate
    from workflows.cell.worker import Worker
    from workflows.driver.trained_states import finished_cell_with_checkpoint, load_trained_engine
    from workflows.metric_names import EVAL_LOSS, EVAL_MOE_EXPERTS_PER_TOKEN

    cell, checkpoint = finished_cell_with_checkpoint(
        study, ws, lambda c: c.router.display() == label and seed in (None, c.seed),
        f"cell of {label}" + (f" with seed {seed}" if seed is not None else ""))
    engine, data = load_trained_engine(study, ws, cell, checkpoint)
    alone = Worker(rank=0, world=1, tracker=None, run_id="")

    evaluations: dict[float, dict[str, float]] = {}  # knob value -> the evaluation's metrics (each run once)

    def measured(value: float) -> dict[str, float]:
        if value not in evaluations:
            set_knob(engine.module, knob.option, value)
            evaluations[value] = evaluate(engine, data, cell, alone).metrics
        return evaluations[value]

    trained_value = read_knob(engine.module, knob.option)
    # As loaded, before any value is set: a router trained at a target compute has a knob per layer.
    trained = evaluate(engine, data, cell, alone).metrics
    try:
        found = calibrate(lambda v: measured(v)[EVAL_MOE_EXPERTS_PER_TOKEN], knob, target, tolerance)
    except CalibrationError as err:
        raise StudyError("--target", [f"{cell.title}: {err}"], "cannot calibrate") from None
    at_value = measured(found.value)
    return CellCalibration(cell.title, knob.option, trained_value, trained[EVAL_MOE_EXPERTS_PER_TOKEN],
                           trained[EVAL_LOSS], found.value, at_value[EVAL_MOE_EXPERTS_PER_TOKEN], at_value[EVAL_LOSS],
                           target, found.evaluations)


def cmd_calibrate(args, out: TextIO) -> int:
    if args.target <= 0:
        raise StudyError("--target", [f"experts per token must be positive, not {args.target:g}"], "cannot calibrate")
    use_threads(args)
    study = study_or_exit(args.study)
    knob = _knob_of(study, args.router)  # a wrong label or a fixed-k router fails before anything loads
    ws = usable_workspace(args, study)
    result = calibrate_cell(study, ws, args.router, knob, args.target, args.seed, args.tolerance)
    print(json.dumps(asdict(result)) if args.format == "json" else result.line(), file=out)
    return 0

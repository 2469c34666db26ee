"""Where a cell's metrics go, and the rules they follow: one MLflow point per step per metric (a resumed run replays
the steps since its checkpoint, and those steps are in the run's history already), which steps are logged, and the
reports every rank sends Ray Train (Tune's schedulers read them). Rank 0 alone writes to MLflow."""
from __future__ import annotations

import ray

from workflows.cell.engine import save_and_report
from workflows.cell.worker import Worker
from workflows.metric_names import TRAIN_STEP
from workflows.study.sections import TrainingConfig
from workflows.tracking import REASON


class MetricSink:
    def __init__(self, w: Worker, training: TrainingConfig):
        self.w, self.training = w, training
        # The latest step this run logged before (a resume's or a restart's earlier attempt): not logged again.
        self.logged_through = w.tracker.last_logged_step(w.run_id, TRAIN_STEP) if w.tracker else 0
        self.latest_eval: dict[str, float] = {}

    @property
    def writes(self) -> bool:
        """Whether this rank writes to MLflow (rank 0)."""
        return self.w.tracker is not None

    def is_new(self, step: int) -> bool:
        """Not yet in the run's history: its metrics, artifacts and curves are logged."""
        return self.writes and step > self.logged_through

    def tag_placement(self, resumed_from: int) -> None:
        """Where the cell ran (multi-node studies), and the step it resumed from."""
        if self.writes:
            self.w.tracker.set_tags(self.w.run_id, {
                "moelab.node_id": ray.get_runtime_context().get_node_id(),
                "moelab.node_ip": ray.util.get_node_ip_address(),
                **({"moelab.resumed_from_step": str(resumed_from)} if resumed_from else {})})

    def fail(self, reason: str) -> None:
        """The cell stops itself: why, on its run. The driver reads it back and marks the run FAILED."""
        if self.writes:
            self.w.tracker.set_tags(self.w.run_id, {REASON: reason})

    def log_first(self, metric: str, metrics: dict[str, float], step: int = 0) -> None:
        """`metrics` with `metric` first in the run's record (MLflow keeps the order of first logging), once."""
        if self.writes and metric in metrics and not self.w.tracker.metric_history(self.w.run_id, metric):
            self.w.tracker.log_metrics(self.w.run_id, {metric: metrics[metric], **metrics}, step)

    def log_step(self, step: int, metrics: dict[str, float], evaluated: bool) -> None:
        """Every log_interval-th step, every evaluation and the last step; each step at most once."""
        t = self.training
        if self.is_new(step) and (step % t.log_interval == 0 or evaluated or step == t.steps):
            self.w.tracker.log_metrics(self.w.run_id, metrics, step)

    def log_curve(self, points: dict[int, dict[str, float]]) -> None:
        """Metrics that describe earlier steps (the saturation curve), each step once: an attempt killed between
        logging these and logging its last step's metrics (a worker that outlived its driver for a moment) has some
        on the run already, and the attempt that redoes the last step must not log them twice. One history read."""
        if not self.writes or not points:
            return
        first_key = next(iter(next(iter(points.values()))), None)
        logged = {m.step for m in self.w.tracker.metric_history(self.w.run_id, first_key)} if first_key else set()
        for step, metrics in sorted(points.items()):
            if metrics and step not in logged:
                self.w.tracker.log_metrics(self.w.run_id, metrics, step)

    def report(self, engine, step: int, metrics: dict[str, float], checkpoint: bool, snapshots: dict) -> None:
        """Every rank, at evaluations and checkpoints: Ray Train's report, carrying the latest evaluation (Tune's
        schedulers compare trials on it), with a checkpoint when one is due."""
        save_and_report(engine, step, {**self.latest_eval, **metrics}, checkpoint, snapshots)

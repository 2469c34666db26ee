"""The sweep's live lines, read from a real MLflow store and the decision file ASHA writes: a trial's start with its
swept values, its progress, ASHA's stop decision the moment it is on file, and its end — each said once."""
from __future__ import annotations

import json

from tuning.progress import TrialWatcher
from workflows.driver.progress import Progress
from workflows.tracking import SWEEP, TRIAL, Tracker


def test_trial_lines_report_starts_progress_asha_stops_and_ends_once(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("sweep")
    parent = tracker.study_run(experiment, "sweep", {})
    trials = {}
    for trial, alpha in (("t_00000", 0.01), ("t_00001", 0.1)):
        trials[trial] = tracker.create_child_run(experiment, parent, f"topk(k=2, switch_lbl={alpha})", {"moelab.role": "trial", SWEEP: "a",
                                                                             TRIAL: trial, "router": "topk(k=2)"},
                                                 {"sweep.balancing.switch_lbl": alpha})
    asha = tmp_path / "asha.json"
    lines: list[str] = []
    watcher = TrialWatcher(tracker, experiment, "a", 60, str(asha), Progress(lines.append, every=0.0))

    watcher.tick()
    assert lines == ["  trial t_00000  topk(k=2, switch_lbl=0.01)  started",
                     "  trial t_00001  topk(k=2, switch_lbl=0.1)  started"]
    for run_id in trials.values():
        tracker.log_metrics(run_id, {"train/step": 20, "train/loss": 5.5, "train/tokens_per_s": 2e4}, 20)
    asha.write_text(json.dumps({"stopped": ["t_00001"], "brackets": []}))
    tracker.finish(trials["t_00001"])  # what TrialRunCloser does once Tune is done with the stopped trial
    lines.clear()
    watcher.tick()
    watcher.tick()  # nothing new: nothing printed twice
    assert lines == ["  ASHA stopped trial t_00001 (topk(k=2, switch_lbl=0.1)) at step 20/60",
                     "  trial t_00001  topk(k=2, switch_lbl=0.1)  finished at step 20/60",
                     "  progress [1/2 trials ended]  trial t_00000 topk(k=2, switch_lbl=0.01)  step 20/60  loss 5.5000  "
                     "20.0k tok/s  ETA —"]

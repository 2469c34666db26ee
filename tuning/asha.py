"""ASHA (Li et al. 2018, arXiv 1810.05934) whose decisions survive a killed driver.

Ray Tune 2.60 snapshots trials and the searcher, but not the scheduler: a restored sweep starts ASHA with empty rungs
and forgets which trials it stopped. This subclass writes its rung records and stop decisions to a JSON file next to
the experiment (a path or an object-store URI) after every decision and reads it back on first use after a restore. Trial functions read the stopped
set too (`stopped_trials`), so a trial stopped just before the kill is not trained again.
"""
from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from workflows import storage


def stopped_trials(state_path: str | Path) -> set[str]:
    location = str(state_path)
    return set(json.loads(storage.read_text(location))["stopped"]) if storage.exists(location) else set()


class ResumableASHA(ASHAScheduler):
    def __init__(self, state_path: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.state_path = str(state_path)
        self.stopped: set[str] = set()
        self._loaded = False
        self._written = ""  # the state last written: results between rungs change nothing and write nothing

    def _load_once(self) -> None:
        # Not in __init__: Tuner.restore unpickles this object from tuner.pkl without calling __init__.
        if self._loaded:
            return
        self._loaded = True
        if not storage.exists(self.state_path):
            return
        state = json.loads(storage.read_text(self.state_path))
        self.stopped = set(state["stopped"])
        for bracket, rungs in zip(self._brackets, state["brackets"]):
            by_milestone = {milestone: recorded for milestone, recorded in rungs}
            bracket._rungs = [(m, dict(by_milestone.get(m, {}))) for m, _ in bracket._rungs]

    def _persist(self) -> None:
        state = json.dumps({"stopped": sorted(self.stopped), "brackets": [b._rungs for b in self._brackets]})
        if state == self._written:
            return
        storage.write_text(self.state_path, state)  # atomic: a kill never leaves half a file
        self._written = state

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load_once()
        if trial.trial_id in self.stopped:
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            self.stopped.add(trial.trial_id)
        self._persist()
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load_once()
        super().on_trial_complete(tune_controller, trial, result)
        self._persist()

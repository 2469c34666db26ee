"""Live progress of a sweep, per trial, read from the trials' MLflow runs, with ASHA's stop decisions as they
happen (from the decision file `ResumableASHA` writes after each one). Runs in a thread beside `Tuner.fit()`."""
from __future__ import annotations

import threading

from tuning.asha import stopped_trials
from workflows.driver.progress import Progress, StepRates, progress_of
from workflows.metric_names import TRAIN_STEP
from workflows.tracking import TRIAL, Tracker


class TrialWatcher:
    def __init__(self, tracker: Tracker, experiment_id: str, sweep_name: str, steps: int, asha_state: str,
                 progress: Progress, interval: float = 1.0):
        self.tracker, self.experiment_id, self.sweep_name = tracker, experiment_id, sweep_name
        self.steps, self.asha_state, self.progress, self.interval = steps, asha_state, progress, interval
        self.rates = StepRates()
        self._reported: set[tuple[str, str]] = set()  # (trial id, event) already printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="moelab-trial-progress", daemon=True)

    def __enter__(self) -> "TrialWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.tick()  # the last decisions and endings

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as err:  # a busy store must not end the sweep; the next reading tries again
                self.progress.log(f"  (progress unavailable: {type(err).__name__}: {err})")

    def _event(self, trial: str, event: str, line: str) -> None:
        if (trial, event) not in self._reported:
            self._reported.add((trial, event))
            self.progress.log(line)

    def tick(self) -> None:
        runs = self.tracker.trial_runs(self.experiment_id, self.sweep_name)
        stopped = stopped_trials(self.asha_state)
        rows = []
        for run in runs:
            # The run's name says what the trial is (router and sampled values) and exists from its creation on.
            trial, router = run.data.tags.get(TRIAL, "?"), run.info.run_name
            self._event(trial, "started", f"  trial {trial}  {router}  started")
            step = int(run.data.metrics.get(TRAIN_STEP, 0))
            if trial in stopped:
                self._event(trial, "stopped", f"  ASHA stopped trial {trial} ({router}) at step {step}/{self.steps}")
            if run.info.status == "RUNNING":
                rows.append(progress_of(run, f"trial {trial} {router}", self.steps, self.rates))
            else:
                self._event(trial, "ended", f"  trial {trial}  {router}  {run.info.status.lower()} at step "
                                            f"{step}/{self.steps}")
        ended = sum(r.info.status != "RUNNING" for r in runs)
        self.progress.show(f"{ended}/{len(runs)} trials ended", rows)


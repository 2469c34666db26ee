"""Live progress: the ETA from step rates, the plain-line cadence off a terminal, and `moelab status --watch`
following a study that another process runs, read from a real MLflow store while that process advances it."""
from __future__ import annotations

import io
import re
import threading
import time

import pytest
import yaml

from workflows.driver.cli import main
from workflows.driver.progress import Progress, RunProgress, StepRates, duration, study_eta
from workflows.study.cells import expand
from workflows.study.loading import parse_study
from workflows.tracking import Tracker


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_is_the_remaining_steps_at_the_rate_seen_since_the_first_logged_step():
    clock = FakeClock()
    rates = StepRates(clock)
    assert rates.eta("run", 0, 100) is None  # still starting: no rate yet, and start-up time is not training
    assert rates.eta("run", 10, 100) is None  # the first logged step: one reading is no rate
    clock.now += 20.0
    assert rates.eta("run", 30, 100) == pytest.approx(70 * 20.0 / 20)  # 1 s/step, 70 steps left
    clock.now += 10.0
    assert rates.eta("run", 40, 100) == pytest.approx(60 * 30.0 / 30)
    assert rates.eta("other", 5, 100) is None  # per run


def test_study_eta_adds_the_queued_cells_at_the_mean_finished_wall_time():
    rows = [RunProgress("a", 50, 100, 5.0, 1e4, 30.0), RunProgress("b", 10, 100, 5.0, 1e4, 90.0)]
    assert study_eta(rows, queued=3, concurrency=2, cell_seconds=[100.0, 140.0]) == pytest.approx(90 + 2 * 120)
    assert study_eta(rows, queued=0, concurrency=2, cell_seconds=[]) == pytest.approx(90)
    assert study_eta(rows, queued=1, concurrency=2, cell_seconds=[]) is None  # nothing finished to go by
    assert duration(75.4) == "1m15s" and duration(None) == "—"


def test_plain_lines_print_a_cell_when_its_step_moved_and_at_most_every_interval():
    lines: list[str] = []
    progress = Progress(lines.append, every=10.0)
    row = lambda step: RunProgress("topk / gpt / seed 0", step, 120, 5.1234, 21300.0, 12.0)  # noqa: E731
    progress.show("1/4 cells done", [row(0)], now=0.0)  # not started: nothing to say
    progress.show("1/4 cells done", [row(20)], now=1.0)
    progress.show("1/4 cells done", [row(30)], now=5.0)  # moved, but within 10 s of the last line
    progress.show("1/4 cells done", [row(30)], now=20.0)  # 19 s after the last line, at a new step: printed
    progress.show("1/4 cells done", [row(30)], now=40.0)  # the step did not move: nothing new to say
    assert lines == ["  progress [1/4 cells done]  topk / gpt / seed 0  step 20/120  loss 5.1234  21.3k tok/s  ETA 12s",
                     "  progress [1/4 cells done]  topk / gpt / seed 0  step 30/120  loss 5.1234  21.3k tok/s  ETA 12s"]


STUDY = {"name": "watched", "seeds": [0], "routers": [{"name": "topk", "k": 2}, {"name": "hash"}],
         "models": [{"name": "gpt", "num_experts": 4}], "datasets": [{"name": "builtin:domains"}],
         "training": {"steps": 40, "log_interval": 10, "eval_interval": 20, "checkpoint_interval": 20}}


def test_status_watch_follows_a_running_study_until_it_ends(tmp_path):
    """Another 'driver' (a thread here, a cluster job for a user) writes the runs; `status --watch` off a terminal
    prints each cell's progress as its logged step moves, each cell's end, and returns once the study run ends."""
    path, workdir = tmp_path / "watched.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(STUDY))
    cells = expand(parse_study(STUDY))
    workdir.mkdir()
    tracker = Tracker(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = tracker.experiment("watched")
    parent = tracker.study_run(experiment, "watched", {})
    runs = {c.id: tracker.create_cell_run(experiment, parent, c.id, c.router.display(), {"router": c.router.display()},
                                          {}) for c in cells}
    watching = threading.Event()

    def drive() -> None:
        watching.wait(30)
        for step in (10, 20, 30, 40):
            for run_id in runs.values():
                tracker.log_metrics(run_id, {"train/step": step, "train/loss": 6.0 - step / 100,
                                             "train/tokens_per_s": 1000.0 * step}, step)
            time.sleep(0.5)
        for run_id in runs.values():
            tracker.finish(run_id)
        tracker.finish(parent)

    driver = threading.Thread(target=drive)
    driver.start()
    out = io.StringIO()
    try:
        watching.set()
        assert _watch(path, workdir, out) == 0
    finally:
        driver.join()
    text = out.getvalue()
    for cell in cells:
        steps = [int(s) for s in re.findall(rf"{re.escape(cell.title)}  step (\d+)/40", text)]
        assert steps and steps == sorted(steps) and set(steps) <= {10, 20, 30, 40}, text
        assert len(steps) >= 2, text  # it followed the run, not only its end
        assert f"finished {cell.id}" in text
        assert re.search(rf"{cell.id}  {re.escape(cell.title)}  FINISHED  step 40/40", text)  # the final table


def _watch(path, workdir, out: io.StringIO) -> int:
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        return main(["status", str(path), "--workdir", str(workdir), "--watch", "--interval", "0.1"])


def test_on_a_terminal_the_progress_is_a_live_table_and_event_lines_print_above_it():
    import os

    from workflows.driver.progress import LiveProgress, progress_for

    leader, follower = os.openpty()
    stream = os.fdopen(follower, "w")
    try:
        progress = progress_for(stream, lambda line: None)
        assert isinstance(progress, LiveProgress)
        progress.log("  started  abc  topk / gpt / seed 0")
        progress.show("0/4 cells done, study ETA 2m00s",
                      [RunProgress("topk / gpt / seed 0", 20, 120, 5.1234, 21300.0, 12.0)])
        time.sleep(0.6)  # at least one refresh (4 per second)
        progress.close()
        stream.flush()
        shown = os.read(leader, 65536).decode(errors="replace")
    finally:
        stream.close()
        os.close(leader)
    assert "started  abc" in shown
    assert "0/4 cells done" in shown and "20/120" in shown and "5.1234" in shown and "21.3k tok/s" in shown

"""Live progress of a study's running cells (or a sweep's trials), read from what their workers already log to
MLflow: `train/step`, `train/loss`, `train/tokens_per_s`. No second channel from the workers.

Two renderings of the same rows: a rich live table on a terminal, plain lines elsewhere (CI, `ray job logs`, a
pipe), one per cell whose step moved, at most every `every` seconds per cell.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from mlflow.entities import Run

from workflows.metric_names import TRAIN_LOSS, TRAIN_STEP, TRAIN_TOKENS_PER_S
from workflows.tracking import Tracker


@dataclass(frozen=True)
class RunProgress:
    label: str
    step: int
    steps: int
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None  # from the step rate seen so far; None until two readings differ


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = max(0, round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _speed(tokens_per_s: float | None) -> str:
    return "—" if tokens_per_s is None else f"{tokens_per_s / 1e3:.1f}k tok/s"


def describe(row: RunProgress) -> str:
    loss = "—" if row.loss is None else f"{row.loss:.4f}"
    return (f"{row.label}  step {row.step}/{row.steps}  loss {loss}  {_speed(row.tokens_per_s)}  "
            f"ETA {duration(row.eta_s)}")


class StepRates:
    """Step rate per run, from the first and latest readings of its step: an ETA needs no worker clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._first: dict[str, tuple[float, int]] = {}

    def eta(self, run_id: str, step: int, steps: int) -> float | None:
        now = self.clock()
        if step == 0:  # still starting: the rate is measured from the first logged step on
            return None
        first = self._first.setdefault(run_id, (now, step))
        if step <= first[1] or now <= first[0]:
            return None
        return (steps - step) * (now - first[0]) / (step - first[1])


def progress_of(run: Run, label: str, steps: int, rates: StepRates) -> RunProgress:
    """From a run as MLflow returns it (get_run or a search): the latest value of each metric."""
    metrics = run.data.metrics
    step = int(metrics.get(TRAIN_STEP, 0))
    return RunProgress(label, step, steps, metrics.get(TRAIN_LOSS), metrics.get(TRAIN_TOKENS_PER_S),
                       rates.eta(run.info.run_id, step, steps))


def read_progress(tracker: Tracker, run_id: str, label: str, steps: int, rates: StepRates) -> RunProgress:
    return progress_of(tracker.client.get_run(run_id), label, steps, rates)


def study_eta(rows: list[RunProgress], queued: int, concurrency: int, cell_seconds: list[float]) -> float | None:
    """What the running cells have left, plus the queued ones at the mean wall time of the finished cells."""
    running = [r.eta_s for r in rows if r.eta_s is not None]
    if queued and not cell_seconds:
        return None
    rest = math.ceil(queued / max(1, concurrency)) * (sum(cell_seconds) / len(cell_seconds)) if queued else 0.0
    if rows and not running:
        return None
    return (max(running) if running else 0.0) + rest


class Progress:
    """What `moelab run`, `tune` and `status --watch` print while runs are going. `log` prints an event line (a cell
    started or finished); `show` the progress of the running ones."""

    def __init__(self, echo: Callable[[str], None], every: float = 10.0):
        self.echo, self.every = echo, every
        self._printed: dict[str, tuple[float, int]] = {}  # label -> (when, step) of its last progress line

    def log(self, line: str) -> None:
        self.echo(line)

    def show(self, header: str, rows: list[RunProgress], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for row in rows:
            when, step = self._printed.get(row.label, (-math.inf, -1))
            if row.step > 0 and row.step != step and now - when >= self.every:
                self._printed[row.label] = (now, row.step)
                self.echo(f"  progress [{header}]  {describe(row)}")

    def close(self) -> None:
        pass

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveProgress(Progress):
    """On a terminal: one live table of the running cells under the event lines (rich)."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream)
        super().__init__(lambda line: self.console.print(line, markup=False, highlight=False), every=0.0)
        self.live = Live(console=self.console, refresh_per_second=4, transient=True)
        self.live.start()

    def show(self, header: str, rows: list[RunProgress], now: float | None = None) -> None:
        from rich.table import Table

        table = Table(title=header, title_justify="left", box=None, pad_edge=False)
        for column in ("cell", "step", "loss", "speed", "ETA"):
            table.add_column(column, justify="left" if column == "cell" else "right")
        for row in rows:
            table.add_row(row.label, f"{row.step}/{row.steps}", "—" if row.loss is None else f"{row.loss:.4f}",
                          _speed(row.tokens_per_s), duration(row.eta_s))
        self.live.update(table)

    def close(self) -> None:
        self.live.stop()


def progress_for(stream: TextIO, echo: Callable[[str], None], every: float = 10.0) -> Progress:
    """A live table on a terminal, plain lines otherwise."""
    return LiveProgress(stream) if stream.isatty() else Progress(echo, every)

"""The one place that talks to MLflow.

Layout: one experiment per study; a parent run per study (tag moelab.role=study); one child run per cell
(tag mlflow.parentRunId, found again by tag moelab.cell_id so a resumed cell reopens its run instead of duplicating it).
Everything goes through an explicit MlflowClient and run ids — no global active-run state — so the driver, Ray
workers on other processes and tests can all write to the same runs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

ROLE, STUDY, CELL, REASON = "moelab.role", "moelab.study", "moelab.cell_id", "moelab.failure_reason"
SWEEP, TRIAL = "moelab.sweep", "moelab.trial_id"
SEQUENCE_LOSSES = "eval/sequence_losses.json"  # a cell's final evaluation, loss per sequence (rank 0's sequences)
PARENT = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment in its GenAI view unless the experiment declares itself a training experiment.
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
# What a summarization cell leaves for the report: each document's output and scores, and the BLEU signature.
PREDICTIONS_ARTIFACT, BLEU_SIGNATURE_TAG = "summaries/test_predictions.jsonl", "moelab.bleu_signature"
_BATCH = 900  # log_batch accepts at most 1000 metrics per call


# A cell that is another cell's `pretrained: cell:...` source logs its final model here (save_pretrained layout).
CHECKPOINT_ARTIFACT = "hf_model"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def metric_key(label: str) -> str:
    """A router or model label as part of a metric name: MLflow allows only word characters, - . / and spaces."""
    return re.sub(r"[^\w\-. /]", "_", label)


def _retry(fn, *args, attempts: int = 8, **kwargs):
    """SQLite allows one writer at a time; concurrent cells can briefly see 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except MlflowException as err:
            if "locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)


def unreachable(tracking_uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an HTTP tracking server cannot be used (None when it answers, or the URI is not HTTP). MLflow's own
    client retries for minutes before it gives up; this asks the server's /health once, with a short timeout."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, checked above)
            if response.status == 200:
                return None
            return f"GET {url} answered HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"GET {url} answered HTTP {err.code}; is this an MLflow tracking server?"
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"GET {url} failed within {timeout_s:.0f}s: {reason}"


class Tracker:
    def __init__(self, tracking_uri: str):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps CLI output (and JSON) clean
        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)

    # --- experiments and runs -------------------------------------------------------------------------------------
    def experiment(self, name: str, artifact_location: str | None = None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return self.client.create_experiment(name, artifact_location=artifact_location,
                                                 tags={EXPERIMENT_KIND: MODEL_TRAINING})
        if found.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:  # created before moelab declared it
            self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return found.experiment_id

    def study_run(self, experiment_id: str, study_name: str, tags: dict[str, str]) -> str:
        runs = self._search(experiment_id, f"tags.`{ROLE}` = 'study' and tags.`{STUDY}` = '{study_name}'")
        if runs:
            self.reopen(runs[0].info.run_id)
            return runs[0].info.run_id
        run = self.client.create_run(experiment_id, run_name=study_name,
                                     tags={ROLE: "study", STUDY: study_name, **tags})
        return run.info.run_id

    def study_status(self, experiment_id: str, study_name: str) -> str | None:
        """RUNNING while a driver runs the study, then how it ended; None before it ever ran."""
        runs = self._search(experiment_id, f"tags.`{ROLE}` = 'study' and tags.`{STUDY}` = '{study_name}'")
        return runs[0].info.status if runs else None

    def cell_runs(self, experiment_id: str, role: str = "cell") -> dict[str, Run]:
        """cell id -> its run (the oldest, should an earlier bug have left two); role 'pretrained' for the
        evaluation-only runs of pretrained baselines."""
        runs: dict[str, Run] = {}
        for run in self._search(experiment_id, f"tags.`{ROLE}` = '{role}'"):
            runs.setdefault(run.data.tags[CELL], run)
        return runs

    def trial_runs(self, experiment_id: str, sweep_name: str) -> list[Run]:
        return self._search(experiment_id, f"tags.`{ROLE}` = 'trial' and tags.`{SWEEP}` = '{sweep_name}'")

    def runs_with_tag(self, experiment_id: str, key: str, value: str) -> list[Run]:
        return self._search(experiment_id, f"tags.`{key}` = '{value}'")

    def create_cell_run(self, experiment_id: str, parent_run_id: str, cell_id: str, run_name: str,
                        tags: dict[str, str], params: dict[str, Any], role: str = "cell") -> str:
        return self.create_child_run(experiment_id, parent_run_id, run_name, {ROLE: role, CELL: cell_id, **tags},
                                     params)

    def create_child_run(self, experiment_id: str, parent_run_id: str, run_name: str, tags: dict[str, str],
                         params: dict[str, Any]) -> str:
        run = _retry(self.client.create_run, experiment_id, run_name=run_name, tags={PARENT: parent_run_id, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_dataset(self, run_id: str, name: str, fingerprint: str, source: str, context: str = "training") -> None:
        """The run's dataset as an MLflow dataset input (the UI's Dataset column and filter): its content
        fingerprint is the digest, so runs on the same data group together whatever they call it."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=fingerprint[:36], source_type="moelab", source=source)
        _retry(self.client.log_inputs, run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def system_metrics(self, run_id: str, sampling_interval_s: float = 5.0):
        """MLflow's system-metrics monitor (CPU, memory, GPU where there is one) logging to this run: start() and
        finish() it around the work it describes."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines are noise

        class WithLastSample(SystemMetricsMonitor):
            """MLflow's monitor drops the sample it is collecting when it stops, so a cell shorter than one
            interval would log none: publish one more at the end."""

            def finish(self) -> None:
                super().finish()
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()

        return WithLastSample(run_id, sampling_interval=sampling_interval_s, tracking_uri=self.uri, resume_logging=True)

    def sweep_run(self, experiment_id: str, study_run_id: str, sweep_name: str, tags: dict[str, str]) -> str:
        """The parent run of a sweep, a child of the study's run; reopened when the sweep resumes."""
        runs = self._search(experiment_id, f"tags.`{ROLE}` = 'sweep' and tags.`{SWEEP}` = '{sweep_name}'")
        if runs:
            self.reopen(runs[0].info.run_id)
            return runs[0].info.run_id
        return self.create_child_run(experiment_id, study_run_id, f"sweep-{sweep_name}",
                                     {ROLE: "sweep", SWEEP: sweep_name, **tags}, {})

    def reopen(self, run_id: str) -> None:
        if self.failure_reason(run_id):  # a re-run clears the verdict of the last attempt
            _retry(self.client.delete_tag, run_id, REASON)
        _retry(self.client.update_run, run_id, status="RUNNING")

    def failure_reason(self, run_id: str) -> str | None:
        return self.client.get_run(run_id).data.tags.get(REASON)

    def finish(self, run_id: str, status: str = "FINISHED", reason: str | None = None) -> None:
        if reason:
            self.set_tags(run_id, {REASON: reason[:4000]})
        _retry(self.client.set_terminated, run_id, status=status)

    # --- logging --------------------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            _retry(self.client.log_batch, run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        _retry(self.client.log_batch, run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        for i in range(0, len(items), _BATCH):
            _retry(self.client.log_batch, run_id, metrics=items[i:i + _BATCH])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        _retry(self.client.log_artifact, run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(run_id, path, None if parent == "." else parent)

    def read_text(self, run_id: str, artifact_file: str) -> str:
        """An artifact's text, through the tracking server's artifact API (works for remote stores too)."""
        with tempfile.TemporaryDirectory() as tmp:
            return Path(_retry(self.client.download_artifacts, run_id, artifact_file, tmp)).read_text()

    def log_folder(self, run_id: str, folder: str | Path, artifact_path: str) -> None:
        _retry(self.client.log_artifacts, run_id, str(folder), artifact_path)

    def download_folder(self, run_id: str, artifact_path: str, into: str | Path) -> Path:
        """A folder artifact (e.g. an exported checkpoint) copied to `into`, through the artifact API."""
        return Path(_retry(self.client.download_artifacts, run_id, artifact_path, str(into)))

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self.client.get_metric_history(run_id, key)

    def last_logged_step(self, run_id: str, key: str) -> int:
        """The latest step `key` was logged at in this run (0 if never)."""
        return max((m.step for m in _retry(self.metric_history, run_id, key)), default=0)

    def _search(self, experiment_id: str, filter_string: str) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self.client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token,
                                           order_by=["attributes.start_time ASC"])
            runs.extend(page)
            token = page.token
            if not token:
                return runs

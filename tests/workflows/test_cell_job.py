"""The driver-worker edge: a CellJob (and a PretrainedJob) survives Ray's pickling and its JSON record as the same
job; and the MetricSink's rules, against a real MLflow store: one point per step, a replayed step not logged twice,
the steps it logs, and a first metric that stays first."""
from __future__ import annotations

import json
import pickle

import pytest

from workflows.cell.job import CellJob, PretrainedJob
from workflows.cell.metric_sink import MetricSink
from workflows.cell.worker import Worker
from workflows.study.cells import PretrainedCell, expand
from workflows.study.entries import DatasetEntry
from workflows.study.loading import parse_study
from workflows.study.sections import PretrainedBaseline, SummarizationConfig, TrainingConfig
from workflows.tracking import REASON, Tracker

STUDY = {"name": "job", "routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}],
         "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
         "datasets": [{"name": "builtin:domains", "vocab_size": 300}], "training": {"steps": 30, "log_interval": 10,
                                                                                 "eval_interval": 15}}


def test_a_cell_job_is_the_same_job_after_pickling_and_after_its_json_record():
    (cell,) = expand(parse_study(STUDY))
    job = CellJob(cell, "s3://bucket/prepared/abc", "http://mlflow:5000", "run-1", export_checkpoint=True,
                  source_run_id="run-0", first_metric="eval/loss")
    assert pickle.loads(pickle.dumps(job)) == job
    again = CellJob.from_json(job.to_json())
    assert again.cell.id == cell.id and again.cell.title == cell.title
    assert json.loads(again.to_json()) == json.loads(job.to_json())
    assert (again.run_id, again.source_run_id, again.export_checkpoint, again.first_metric) == (
        "run-1", "run-0", True, "eval/loss")


def test_a_pretrained_job_keeps_its_cell_id_through_json():
    summarization = SummarizationConfig(pretrained=[PretrainedBaseline(model="t5-small")])
    cell = PretrainedCell(summarization.pretrained[0], DatasetEntry(name="builtin:method_names"), summarization)
    job = PretrainedJob(cell, "/prepared", "sqlite:////tmp/m.db", "run-2")
    assert PretrainedJob.from_json(job.to_json()).cell.id == cell.id
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.fixture
def run(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("sink")
    return tracker, tracker.create_child_run(experiment, tracker.study_run(experiment, "sink", {}), "cell", {}, {})


def steps_of(tracker, run_id, key):
    return [m.step for m in tracker.metric_history(run_id, key)]


def test_the_sink_logs_every_log_interval_every_evaluation_and_the_last_step(run):
    tracker, run_id = run
    sink = MetricSink(Worker(0, 1, tracker, run_id), TrainingConfig(steps=30, log_interval=10, eval_interval=15))
    for step in range(1, 31):
        sink.log_step(step, {"train/loss": 1.0 / step, "train/step": step}, evaluated=step % 15 == 0 or step == 30)
    assert steps_of(tracker, run_id, "train/loss") == [10, 15, 20, 30]


def test_a_resumed_run_logs_no_step_twice_and_the_first_metric_stays_first(run):
    tracker, run_id = run
    training = TrainingConfig(steps=30, log_interval=10, eval_interval=15)
    first = MetricSink(Worker(0, 1, tracker, run_id), training)
    first.log_first("eval/loss", {"eval/moe/load_cv": 0.5, "eval/loss": 6.0})
    for step in range(1, 23):  # killed after step 22, its checkpoint at step 15
        first.log_step(step, {"train/loss": 1.0, "train/step": step}, evaluated=step == 15)
    resumed = MetricSink(Worker(0, 1, tracker, run_id), training)
    assert resumed.logged_through == 20
    resumed.log_first("eval/loss", {"eval/loss": 5.0})  # a restart's step-0 evaluation: already there
    for step in range(16, 31):
        resumed.log_step(step, {"train/loss": 2.0, "train/step": step}, evaluated=step == 30)
    assert steps_of(tracker, run_id, "train/loss") == [10, 15, 20, 30]
    assert [m.value for m in tracker.metric_history(run_id, "train/loss")] == [1.0, 1.0, 1.0, 2.0]
    assert steps_of(tracker, run_id, "eval/loss") == [0]
    assert next(iter(tracker.client.get_run(run_id).data.metrics)) == "eval/loss"


def test_only_rank_zero_writes_and_a_failure_is_recorded_on_the_run(run):
    tracker, run_id = run
    other_rank = MetricSink(Worker(1, 2, None, run_id), TrainingConfig())
    other_rank.log_step(10, {"train/loss": 1.0}, evaluated=False)
    other_rank.fail("not written by rank 1")
    assert tracker.metric_history(run_id, "train/loss") == [] and tracker.failure_reason(run_id) is None
    MetricSink(Worker(0, 2, tracker, run_id), TrainingConfig()).fail("non-finite loss at step 3")
    assert tracker.client.get_run(run_id).data.tags[REASON] == "non-finite loss at step 3"


def test_a_curve_of_earlier_steps_is_logged_once_when_the_last_step_is_redone(run):
    """An attempt killed after the saturation curve but before its last step's metrics: the next attempt redoes the
    last step, and the curve keeps one point per step."""
    tracker, run_id = run
    for _attempt in range(2):
        sink = MetricSink(Worker(0, 1, tracker, run_id), TrainingConfig(steps=80, eval_interval=40))
        assert sink.is_new(80)
        sink.log_curve({step: {"eval/moe/saturation": step / 80, "eval/moe/block0/saturation": step / 80}
                        for step in (40, 80)})
    assert steps_of(tracker, run_id, "eval/moe/saturation") == [40, 80]
    assert steps_of(tracker, run_id, "eval/moe/block0/saturation") == [40, 80]

"""`moelab`: run, validate, inspect and aggregate routing studies.

Exit codes: 0 all cells finished, 1 some cells failed, 2 invalid input.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, TextIO

# Nothing heavy at import: torch, DeepSpeed and Ray load inside a command, once stdout is kept for its results.

DEFAULT_WORKDIR = "./moelab-runs"


def _study(path: str):
    from workflows.study import StudyError, load_study

    try:
        study = load_study(path)
    except StudyError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2)
    for warning in study.warnings():
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return study


def cmd_validate(args, out: TextIO) -> int:
    from workflows.cells import expand

    study = _study(args.study)
    print(f"{args.study}: valid — {len(expand(study))} cells "
          f"({len(study.routers)} routers x {len(study.models)} models x {len(study.datasets)} datasets x "
          f"{len(study.seeds)} seeds)", file=out)
    return 0


def _workspace(args, study=None):
    """The study's workspace, once its tracking store can be used. With `study` (read-only commands) the study
    must already be there: they never create a workdir, a database or an experiment."""
    from workflows.runner import Workspace
    from workflows.study import StudyError
    from workflows.tracking import unreachable

    ws = Workspace.resolve(args.workdir, getattr(args, "tracking_uri", None), getattr(args, "storage_path", None))
    if why := unreachable(ws.tracking_uri):
        raise StudyError("--tracking-uri", [f"MLflow tracking server {ws.tracking_uri} is unreachable: {why}"],
                         "cannot track the study")
    if study is not None and ws.is_local_tracking:
        database = Path(ws.tracking_uri.removeprefix("sqlite:///"))
        if ws.tracking_uri.startswith("sqlite:///") and not database.is_file():
            raise StudyError("--workdir", [f"no study {study.name!r} here: {ws.root} holds no MLflow database "
                                           f"({database}); run `moelab run {args.study} --workdir {args.workdir}` "
                                           "first, or pass the workdir it ran in"], "nothing to read")
    return ws


def cmd_run(args, out: TextIO) -> int:
    from workflows.runner import run_study

    study = _study(args.study)
    ws = _workspace(args)
    outcome = run_study(study, ws, args.address, echo=lambda line: print(line, file=out, flush=True),
                        verbose=args.verbose)
    t = outcome.timings
    print(f"\ntable: {outcome.table_path}\n"
          f"MLflow: mlflow ui --backend-store-uri {ws.tracking_uri}  (experiment {study.name!r})\n"
          f"time: {t['total_s']:.1f}s total = {t['prepare_data_s']:.1f}s data + {t['ray_init_s']:.1f}s Ray start + "
          f"{t['cells_s']:.1f}s cells", file=out)
    print(outcome.table_path.read_text(), file=out)
    if outcome.summarization_report:
        print(f"summarization report: {outcome.summarization_report}\n", file=out)
        print(outcome.summarization_report.read_text().split("### Samples")[0], file=out)
    return _exit_code("cell", outcome.failed)


def _exit_code(kind: str, failed: dict[str, str]) -> int:
    """0 when everything finished; 1 with a summary naming each failure and its reason."""
    if not failed:
        return 0
    print(f"{len(failed)} {kind}(s) failed:", file=sys.stderr)
    for name, reason in failed.items():
        print(f"  {name}: {reason[:500]}", file=sys.stderr)
    return 1


def cmd_tune(args, out: TextIO) -> int:
    from tuning.runner import tune_study

    study = _study(args.study)
    if study.sweep is None:
        print(f"{args.study}: invalid study\n  sweep: missing; `moelab tune` needs a sweep section", file=sys.stderr)
        return 2
    ws = _workspace(args)
    outcome = tune_study(study, ws, args.address, echo=lambda line: print(line, file=out, flush=True),
                         verbose=args.verbose)
    print(f"\n{outcome.trials} trials in {outcome.seconds:.1f}s; MLflow: mlflow ui --backend-store-uri "
          f"{ws.tracking_uri}\n\n{outcome.best_table}", file=out)
    return _exit_code("trial", outcome.failed)


def _runs(study, args):
    """(tracker, cell id -> run, workspace) of a study that has run here; a clear error when it has not."""
    from workflows.study import StudyError
    from workflows.tracking import Tracker

    ws = _workspace(args, study)
    tracker = Tracker(ws.tracking_uri)
    found = tracker.client.get_experiment_by_name(study.name)
    if found is None:
        raise StudyError("--workdir", [f"no study {study.name!r} in {ws.tracking_uri}: no MLflow experiment of that "
                                       f"name; run `moelab run {args.study}` with this workdir / tracking URI first"],
                         "nothing to read")
    return tracker, tracker.cell_runs(found.experiment_id), ws


def cmd_status(args, out: TextIO) -> int:
    from workflows.cells import expand
    from workflows import storage
    from workflows.runner import ray_checkpoints
    from workflows.tracking import REASON

    study = _study(args.study)
    tracker, runs, ws = _runs(study, args)
    for cell in expand(study):
        run = runs.get(cell.id)
        if run is None:
            print(f"{cell.id}  {cell.title}  PENDING", file=out)
            continue
        history = tracker.metric_history(run.info.run_id, "train/loss")
        step, loss = (history[-1].step, f"{history[-1].value:.4f}") if history else (0, "—")
        reason = f"  reason: {run.data.tags[REASON]}" if REASON in run.data.tags else ""
        checkpoint = "checkpoint" if ray_checkpoints(storage.join(ws.cell_storage(study.name), cell.id)) \
            else "no checkpoint"
        print(f"{cell.id}  {cell.title}  {run.info.status}  step {step}/{study.training.steps}  loss {loss}  "
              f"{checkpoint}{reason}", file=out)
    if study.sweep:
        _sweep_status(study, tracker, ws, out)
    return 0


def _trial_runs(study, tracker) -> list:
    found = tracker.client.get_experiment_by_name(study.name)
    return tracker.trial_runs(found.experiment_id, study.sweep.name) if found else []


def _sweep_status(study, tracker, ws, out: TextIO) -> None:
    from tuning.report import trial_rows
    from workflows import storage
    from workflows.runner import ray_checkpoints

    runs = _trial_runs(study, tracker)
    print(f"sweep {study.sweep.name}: {len(runs)} trial(s)", file=out)
    for row in trial_rows(runs, study.sweep):
        params = " ".join(f"{k}={row[k]}" for k in study.sweep.space)
        metric = row[study.sweep.metric]
        checkpoint = ray_checkpoints(storage.join(ws.storage_path, f"train-trial_id={row['trial']}"))
        print(f"  trial {row['trial']}  {row['router']}  {params}  {row['status']}  step {row['steps']}  "
              f"{study.sweep.metric} {metric if metric is None else f'{metric:.4f}'}  "
              f"{'checkpoint' if checkpoint else 'no checkpoint'}"
              + (f"  reason: {row['reason']}" if row["reason"] else ""), file=out)


def cmd_aggregate(args, out: TextIO) -> int:
    from workflows.aggregate import table_rows, to_csv, to_markdown
    from workflows.cells import expand

    study = _study(args.study)
    tracker, runs, ws = _runs(study, args)
    cells = expand(study)
    rows = table_rows(cells, runs)
    text = to_markdown(rows) if args.format == "md" else to_csv(rows)
    if study.sweep and args.format == "md":
        text += "\n" + _sweep_best(study, args)
    if args.format == "md" and any(cell.summarization for cell in cells):
        from workflows.runner import prepare_datasets, summarization_texts
        from workflows.summary_report import write_summarization_report

        texts = summarization_texts(prepare_datasets(study, ws))
        found = tracker.client.get_experiment_by_name(study.name)
        pretrained = tracker.cell_runs(found.experiment_id, role="pretrained") if found else {}
        report = write_summarization_report(study, cells, runs, tracker, texts, ws.root, None, pretrained)
        text += "\n" + (report.read_text() if report else "(no finished summarization cells)\n")
    if args.out:
        Path(args.out).write_text(text)
    else:
        out.write(text)
    return 0


def _sweep_best(study, args) -> str:
    from tuning.report import best_table, trial_rows

    tracker, _, _ = _runs(study, args)
    return best_table(trial_rows(_trial_runs(study, tracker), study.sweep), study.sweep)


@contextlib.contextmanager
def _results_only_on_stdout() -> Iterator[TextIO]:
    """While a command runs, fd 1 and `sys.stdout` lead to stderr: DeepSpeed's logger (a handler on sys.stdout),
    Ray's banners and C libraries all write there, and `aggregate --format csv > t.csv` must hold the table alone.
    Yields the stream for the command's own output: the stdout it started with."""
    sys.stdout.flush()
    started_with, saved_fd = sys.stdout, os.dup(1)
    # A caller's own stream (pytest's capture, a StringIO) stays the results stream; fd 1 gets a private duplicate.
    results = (os.fdopen(os.dup(saved_fd), "w", encoding=started_with.encoding or "utf-8")
               if started_with is sys.__stdout__ else started_with)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield results
    finally:
        results.flush()
        sys.stderr.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
        sys.stdout = started_with
        if results is not started_with:
            results.close()


def cmd_routers(args, out: TextIO) -> int:
    import json

    from moe_models.characterize import profile_all, profile_states

    profiles = profile_all(args.tokens, args.d_model, args.experts)
    if args.study:  # also on a trained cell's real hidden states (the report's "routers in a pretrained model")
        from workflows.trained_states import trained_hidden_states

        study = _study(args.study)
        ws = _workspace(args, study)
        x, ids, dom, experts, vocab, title = trained_hidden_states(study, ws, args.tokens)
        profiles += profile_states(x, ids, dom, experts, vocab, f"trained: {title}")
    rows = [p.as_dict() for p in profiles]
    if args.format == "json":
        print(json.dumps(rows, indent=2), file=out)
        return 0
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|", file=out)
    for p in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in p.values()) + " |", file=out)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, fn, help: str, workdir: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("study", help="study YAML file")
        if workdir:
            c.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"state directory (default {DEFAULT_WORKDIR})")
            c.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<workdir>/mlflow.db)")
            c.add_argument("--storage-path", help="where checkpoints and prepared data go: a shared filesystem path or "
                                                  "an object-store URI such as s3://bucket/dir (required on a "
                                                  "multi-node cluster; default <workdir>)")
        c.set_defaults(fn=fn)
        return c

    run = command("run", cmd_run, "run (or resume) a study")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--verbose", action="store_true", help="stream Ray worker logs to the terminal")
    tune_cmd = command("tune", cmd_tune, "run (or resume) the study's sweep with Ray Tune")
    tune_cmd.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    tune_cmd.add_argument("--verbose", action="store_true", help="stream Ray worker logs to the terminal")
    command("validate", cmd_validate, "validate a study file only", workdir=False)
    routers = sub.add_parser("routers", help="the router registry, characterized on random hidden states (and, "
                                              "with --study, on a trained cell's)")
    routers.add_argument("--format", choices=("table", "json"), default="table")
    routers.add_argument("--study", help="a study with a finished MoE cell: also route its trained hidden states")
    routers.add_argument("--workdir", default=DEFAULT_WORKDIR)
    routers.add_argument("--tracking-uri")
    routers.add_argument("--storage-path")
    routers.add_argument("--tokens", type=int, default=4096)
    routers.add_argument("--d-model", type=int, default=256)
    routers.add_argument("--experts", type=int, default=8)
    routers.set_defaults(fn=cmd_routers)
    command("status", cmd_status, "one line per cell: state, step, loss")
    agg = command("aggregate", cmd_aggregate, "print or write the comparison table")
    agg.add_argument("--format", choices=("md", "csv"), default="md")
    agg.add_argument("--out", help="write to this file instead of stdout")
    return p


def _dispatch(args, out: TextIO) -> int:
    from workflows.study import StudyError

    try:
        return args.fn(args, out)
    except StudyError as err:  # found after parsing: missing domain labels, a cluster the study cannot use
        print(err, file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with _results_only_on_stdout() as out:
        try:
            return _dispatch(args, out)
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    raise SystemExit(main())

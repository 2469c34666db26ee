"""The commands that validate and launch: `validate`, `run`, `tune`. Each takes its parsed arguments and the
stream for its own output (stdout), and returns the exit code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


def study_or_exit(path: str, seeds: str | None = None):
    """The validated study (exit 2 with the problems otherwise); `seeds` ("3,4,5", from --seeds) replaces its seeds:
    the same study on other seeds, in the same workdir and experiment (a replication)."""
    from workflows.study.errors import StudyError
    from workflows.study.loading import load_study, with_seeds

    try:
        study = load_study(path)
        if seeds is not None:
            study = with_seeds(study, seeds)
    except StudyError as err:
        print(err, file=sys.stderr)
        raise SystemExit(2)
    for warning in study.warnings():
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return study


def use_threads(args) -> None:
    """The torch threads of a command that computes on the driver (`--threads`). Why not torch's default of every
    core: such a command often runs beside a study whose cells hold those cores, and oversubscribed threads wait on
    each other (3x slower measured, and noisier latencies)."""
    import torch

    if args.threads < 1:
        from workflows.study.errors import StudyError

        raise StudyError("--threads", [f"must be at least 1, not {args.threads}"], "cannot compute")
    torch.set_num_threads(args.threads)


def usable_workspace(args, study=None):
    """The study's workspace, once its tracking store can be used. With `study` (read-only commands) the study
    must already be there: they never create a workdir, a database or an experiment."""
    from workflows.driver.workspace import Workspace
    from workflows.study.errors import StudyError
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


def cmd_validate(args, out: TextIO) -> int:
    from moe_models.pretrained.source import without_hub
    from workflows.study.cells import expand

    if args.no_hub:  # every check but those only the hub answers, each named
        with without_hub() as skipped:
            study = study_or_exit(args.study)
            memory = _memory_estimates(study)
        for check in skipped:
            print(f"{args.study}: skipped (needs the hub): {check}", file=sys.stderr)
    else:
        study = study_or_exit(args.study)
        memory = _memory_estimates(study)
    filtered = ", less the pairs models[].routers leaves out" if any(m.routers for m in study.models) else ""
    print(f"{args.study}: valid — {len(expand(study))} cells "
          f"({len(study.routers)} routers x {len(study.models)} models x {len(study.datasets)} datasets x "
          f"{len(study.seeds)} seeds{filtered})", file=out)
    for line in memory:
        print(line, file=out)
    return 0


def _memory_estimates(study) -> list[str]:
    """One line per `hf` model: its estimated memory per rank (workflows/study/memory.py)."""
    from workflows.study.pretrained_sources import model_memory

    return [f"  models[{j}] ({model.display()}): {memory.describe()}" for j, model in enumerate(study.models)
            if model.name == "hf" and (memory := model_memory(study, j)) is not None]


def _torch_first() -> None:
    """Load torch before MLflow, scipy and Ray bring in numpy's libraries: validation used to import it first, and
    a cluster job's driver failed to load libtorch_cpu.so (oneMKL) when it came later."""
    import torch  # noqa: F401


def cmd_run(args, out: TextIO) -> int:
    _torch_first()
    from workflows.driver.progress import progress_for
    from workflows.driver.runner import run_study

    study = study_or_exit(args.study, args.seeds)
    ws = usable_workspace(args)
    echo = lambda line: print(line, file=out, flush=True)  # noqa: E731
    outcome = run_study(study, ws, args.address, echo, args.verbose, progress_for(out, echo, args.progress_every))
    t = outcome.timings
    print(f"\ntable: {outcome.table_path}\n"
          f"MLflow: mlflow ui --backend-store-uri {ws.tracking_uri}  (experiment {study.name!r})\n"
          f"time: {t['total_s']:.1f}s total = {t['prepare_data_s']:.1f}s data + {t['ray_init_s']:.1f}s Ray start + "
          f"{t['cells_s']:.1f}s cells", file=out)
    print(outcome.table_path.read_text(), file=out)
    print(f"seeds pooled: {outcome.pooled_path}\n\n{outcome.pooled_path.read_text()}", file=out)
    if outcome.plots:
        print(f"plots: {', '.join(str(p) for p in outcome.plots)}\n", file=out)
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
    _torch_first()
    from tuning.runner import tune_study
    from workflows.driver.progress import progress_for

    study = study_or_exit(args.study)
    if study.sweep is None:
        print(f"{args.study}: invalid study\n  sweep: missing; `moelab tune` needs a sweep section", file=sys.stderr)
        return 2
    ws = usable_workspace(args)
    echo = lambda line: print(line, file=out, flush=True)  # noqa: E731
    outcome = tune_study(study, ws, args.address, echo, args.verbose, progress_for(out, echo, args.progress_every))
    print(f"\n{outcome.trials} trials in {outcome.seconds:.1f}s; MLflow: mlflow ui --backend-store-uri "
          f"{ws.tracking_uri}\n\n{outcome.best_table}", file=out)
    return _exit_code("trial", outcome.failed)

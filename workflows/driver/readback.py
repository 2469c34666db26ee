"""The read-only commands: `status`, `aggregate`, `routers`. They read what a study left in MLflow and on storage,
and never create a workdir, a database or an experiment."""
from __future__ import annotations

import sys

from pathlib import Path
from typing import TextIO

from workflows.driver.commands import study_or_exit, usable_workspace, use_threads
from workflows.driver.workspace import DEFAULT_WORKDIR
from workflows.metric_names import TRAIN_LOSS
from workflows.report.render import render


def _runs(study, args):
    """(tracker, cell id -> run, workspace) of a study that has run here; a clear error when it has not."""
    from workflows.study.errors import StudyError
    from workflows.tracking import Tracker

    ws = usable_workspace(args, study)
    tracker = Tracker(ws.tracking_uri)
    found = tracker.client.get_experiment_by_name(study.name)
    if found is None:
        raise StudyError("--workdir", [f"no study {study.name!r} in {ws.tracking_uri}: no MLflow experiment of that "
                                       f"name; run `moelab run {args.study}` with this workdir / tracking URI first"],
                         "nothing to read")
    return tracker, tracker.cell_runs(found.experiment_id), ws


def cmd_status(args, out: TextIO) -> int:
    from workflows import storage
    from workflows.driver.workspace import ray_checkpoints
    from workflows.study.cells import expand
    from workflows.tracking import REASON

    study = study_or_exit(args.study, args.seeds)
    tracker, runs, ws = _runs(study, args)
    if args.watch:
        runs = watch_cells(study, tracker, runs, out, args.interval)
    for cell in expand(study):
        run = runs.get(cell.id)
        if run is None:
            print(f"{cell.id}  {cell.title}  PENDING", file=out)
            continue
        history = tracker.metric_history(run.info.run_id, TRAIN_LOSS)
        step, loss = (history[-1].step, f"{history[-1].value:.4f}") if history else (0, "—")
        reason = f"  reason: {run.data.tags[REASON]}" if REASON in run.data.tags else ""
        checkpoint = "checkpoint" if ray_checkpoints(storage.join(ws.cell_storage(study.name), cell.id)) \
            else "no checkpoint"
        print(f"{cell.id}  {cell.title}  {run.info.status}  step {step}/{study.training.steps}  loss {loss}  "
              f"{checkpoint}{reason}", file=out)
    if study.sweep:
        _sweep_status(study, tracker, ws, out)
    return 0


def watch_cells(study, tracker, runs: dict, out: TextIO, interval: float) -> dict:
    """Progress of a study running elsewhere (a cluster job, another terminal), read from its MLflow runs, until
    none of its cells is running and its study run has ended. Returns the cells' final runs."""
    import time

    from workflows.driver.progress import StepRates, progress_for, progress_of
    from workflows.study.cells import expand

    cells = {cell.id: cell for cell in expand(study)}
    experiment_id = tracker.client.get_experiment_by_name(study.name).experiment_id
    progress = progress_for(out, lambda line: print(line, file=out, flush=True), every=interval)
    rates, ended = StepRates(), set()
    try:
        while True:
            running = {cid: run for cid, run in runs.items() if cid in cells and run.info.status == "RUNNING"}
            for cid, run in runs.items():
                if cid in cells and run.info.status in ("FINISHED", "FAILED", "KILLED") and cid not in ended:
                    ended.add(cid)
                    progress.log(f"  {run.info.status.lower():8} {cid}  {cells[cid].title}")
            rows = [progress_of(run, cells[cid].title, study.training.steps, rates) for cid, run in running.items()]
            progress.show(f"{len(ended)}/{len(cells)} cells ended", rows)
            if not running and tracker.study_status(experiment_id, study.name) != "RUNNING":
                return runs
            time.sleep(interval)
            runs = tracker.cell_runs(experiment_id)
    finally:
        progress.close()


def _trial_runs(study, tracker) -> list:
    found = tracker.client.get_experiment_by_name(study.name)
    return tracker.trial_runs(found.experiment_id, study.sweep.name) if found else []


def _sweep_status(study, tracker, ws, out: TextIO) -> None:
    from tuning.report import trial_rows
    from workflows import storage
    from workflows.driver.workspace import ray_checkpoints

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


def _ratings(args, out: TextIO) -> int:
    """--ratings: the filled blind sheets joined with their key; exit 2 naming the file, row and column of a bad
    entry."""
    from workflows.report.ratings import RatingError, ratings_report

    sheets = [Path(p) for p in args.ratings]
    key = Path(args.ratings_key) if args.ratings_key else \
        Path(args.workdir) / sheets[0].name.replace("_rating_sheet", "_rating_key")
    for path, flag in [*((s, "--ratings") for s in sheets), (key, "--ratings-key")]:
        if not path.is_file():
            print(f"{flag}: {path} does not exist", file=sys.stderr)
            return 2
    try:
        out.write(ratings_report(sheets, key, args.format if args.format != "csv" else "csv"))
    except RatingError as err:
        print(err, file=sys.stderr)
        return 2
    return 0


def _claims_section(study, cells, runs, pooled, losses, tracker, args) -> str:
    """The claims table; with --replicate, each claim decided again on those seeds' cells, side by side."""
    from workflows.report.claims import claims_report
    from workflows.report.exports import pool_with_losses
    from workflows.study.cells import expand

    replication = None
    if args.replicate:
        again = expand(study_or_exit(args.study, args.replicate))
        again_pooled, again_losses = pool_with_losses(again, runs, study.baseline, tracker, study.claims)
        replication, losses = (again, again_pooled), {**losses, **again_losses}
    heading = "\n### Claims\n\n" if args.format == "md" else "\n"
    return heading + claims_report(study.claims, study.baseline, cells, runs, pooled, losses, args.format,
                                   replication)


def cmd_aggregate(args, out: TextIO) -> int:
    """md: every cell, then the seeds pooled (with the regime check); csv: one row per cell (raw, for analysis);
    latex and html: the pooled table, ready for a paper or a page."""
    from workflows.report.exports import pool_with_losses, pooled_report
    from workflows.report.table import table_rows, to_csv, to_markdown
    from workflows.study.cells import expand

    study = study_or_exit(args.study, args.seeds)
    if args.ratings:
        return _ratings(args, out)
    tracker, runs, ws = _runs(study, args)
    cells = expand(study)
    rows = table_rows(cells, runs)
    if args.format == "csv":
        text = to_csv(rows)
    else:  # the cells' sequence losses read once, for the pooled table and the claims
        pooled, losses = pool_with_losses(cells, runs, study.baseline, tracker, study.claims)
        text = pooled_report(cells, runs, study.baseline, args.format, rows=pooled)
        if args.format == "md":
            text = to_markdown(rows) + "\n### Seeds pooled\n\n" + text
        if study.claims:
            text += _claims_section(study, cells, runs, pooled, losses, tracker, args)
    if args.format == "md":
        from workflows.report.predictors import predictors_report

        predicting = predictors_report(cells, runs)
        text += ("\n### Which routing metrics predict validation loss\n\n" + predicting) if predicting else ""
    if study.sweep and args.format == "md":
        text += "\n" + _sweep_best(study, args)
    if args.format == "md" and any(cell.summarization for cell in cells):
        from workflows.driver.data import prepare_datasets, summarization_texts
        from workflows.report.summarization import write_summarization_report

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


def cmd_routers(args, out: TextIO) -> int:
    import json

    from moe_models.characterize import pool_profiles, profile_all, profile_states

    use_threads(args)
    seeds = tuple(range(args.seeds))
    # Every input is read before any profiling: a wrong path is refused in a second, not after the minutes of timing
    # that a loaded machine can take.
    real_states = []
    if args.study:  # a trained cell's real hidden states (the report's "routers in a pretrained model")
        from workflows.driver.trained_states import trained_hidden_states

        study = study_or_exit(args.study)
        x, ids, dom, experts, vocab, title = trained_hidden_states(study, usable_workspace(args, study), args.tokens)
        real_states.append((x, ids, dom, experts, vocab, f"trained: {title}"))
    if args.hidden_states:  # a pretrained encoder's hidden states over the built-in domain corpus
        from workflows.driver.encoder_states import encoder_hidden_states

        try:
            x, ids, dom, vocab, title = encoder_hidden_states(args.hidden_states, args.tokens)
        except (OSError, ValueError) as err:  # no such folder, not cached offline, too few tokens
            print(f"moelab routers: --hidden-states {args.hidden_states!r}: {str(err).splitlines()[0][:300]}",
                  file=sys.stderr)
            return 2
        real_states.append((x, ids, dom, args.experts, vocab, title))
    profiles = profile_all(args.tokens, args.d_model, args.experts, seeds=seeds)
    for x, ids, dom, experts, vocab, title in real_states:
        profiles += profile_states(x, ids, dom, experts, vocab, title, seeds, decoding=False)
    rows = pool_profiles(profiles)
    if args.format == "json":
        print(json.dumps(rows, indent=2), file=out)
        return 0
    print(router_table(rows), file=out)
    return 0


def router_table(rows: list[dict]) -> str:
    """Means over the routers' initialization seeds, with 95% intervals from MIN_SEEDS_FOR_INTERVAL seeds on (fewer:
    said, not shown)."""
    from moe_eval.bootstrap import MIN_SEEDS_FOR_INTERVAL

    def cell(row: dict, measure: str, digits: int) -> str:
        ci = row[f"{measure}_ci"]
        shown = ci is not None and row["seeds"] >= MIN_SEEDS_FOR_INTERVAL
        return f"{row[measure]:.{digits}f}" + (f" ± {ci:.{digits}f}" if shown else "")

    headers = ["router", "hidden states", "seeds", "parameters", "latency ms", "× linear", "entropy",
               "mean top-k prob", "experts/token", "load CV", "decoder ms/token"]
    table = [dict(zip(headers, (r["router"], r["hidden_states"], r["seeds"], r["parameters"], cell(r, "latency_ms", 3),
                                "—" if r["latency_vs_linear"] is None else f"{r['latency_vs_linear']:.2f}",
                                cell(r, "entropy", 3), cell(r, "mean_topk_prob", 3), cell(r, "experts_per_token", 2),
                                cell(r, "load_cv", 3),
                                "—" if r["decode_ms_per_token"] is None else cell(r, "decode_ms_per_token", 2))))
             for r in rows]
    text = render(headers, table, "md").rstrip("\n")
    if rows and min(r["seeds"] for r in rows) < MIN_SEEDS_FOR_INTERVAL:
        text += (f"\n\nFewer than {MIN_SEEDS_FOR_INTERVAL} seeds: no intervals "
                 f"(pass --seeds {MIN_SEEDS_FOR_INTERVAL} or more).")
    return text


def cmd_findings(args, out: TextIO) -> int:
    """The findings: per study, one paragraph of setup and its claims table, computed from its runs in the first of
    the workdirs where it ran; nothing typed by hand. One page (stdout or --out), where a study that ran in none of
    the workdirs says so; or with --out-dir one page per study that ran there, the pages of the others left as they
    were (each says which command and day made it), and an index of them all, which keeps the rows of pages made
    by an earlier command."""
    from workflows.study.cells import expand

    workdirs = args.workdir or [DEFAULT_WORKDIR]
    studies = [(path, study) for path in args.studies if (study := study_or_exit(path)).claims]
    if args.out_dir:
        return _findings_pages(studies, args, workdirs, Path(args.out_dir))
    parts = ["# Findings", "",
             "Generated by `moelab findings` from the studies' runs: each claim's verdict is computed (docs/claims.md).",
             ""]
    for path, study in studies:
        section = _study_findings(study, path, args, workdirs)
        parts += [f"## {study.name}", "",
                  section or f"{_setup_paragraph(study, path, len(expand(study)))}\n\nNot run in {', '.join(workdirs)}: "
                             f"`moelab run {path} --workdir {workdirs[0]}`.\n"]
    page = "\n".join(parts)
    if args.out:
        Path(args.out).write_text(page)
    else:
        out.write(page)
    return 0


def _findings_pages(studies, args, workdirs: list[str], folder: Path) -> int:
    import datetime

    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(["moelab findings STUDY", *[f"--workdir {w}" for w in workdirs],
                        *([f"--replicate {args.replicate}"] if args.replicate else [])])
    rows = _index_rows(folder / "index.md")  # the pages of studies not given this time stay in the index
    for path, study in studies:
        page = folder / f"{study.name}.md"
        section = _study_findings(study, path, args, workdirs)
        if section is not None:
            day = datetime.date.today().isoformat()
            page.write_text(f"# {study.name}\n\nGenerated on {day} by `{command.replace('STUDY', path)}`.\n\n"
                            f"{section}")
        else:
            print(f"{path}: not run in {', '.join(workdirs)}; {page} left as it is", file=sys.stderr)
        rows[path] = f"| `{path}` | " + (f"[{study.name}]({page.name})" if page.exists() else "not run yet") + " |"
    index = ["# Findings", "",
             "Each findings study's claims, decided from its runs by `moelab findings` (how: [claims](../claims.md)); "
             "nothing on these pages is typed by hand.", "", "| study | page |", "|---|---|", *rows.values()]
    (folder / "index.md").write_text("\n".join(index) + "\n")
    return 0


def _index_rows(index: Path) -> dict[str, str]:
    """The study rows of an index written before, by study path, in their order."""
    import re

    if not index.is_file():
        return {}
    return {match.group(1): line for line in index.read_text().splitlines()
            if (match := re.match(r"\| `([^`]+)` \|", line))}


def _study_findings(study, path: str, args, workdirs: list[str]) -> str | None:
    """A study's setup paragraph and claims table from the first workdir where it ran, or None."""
    from workflows.report.exports import pool_with_losses
    from workflows.study.cells import expand

    found = _first_run(study, path, args, workdirs)
    if found is None:
        return None
    cells = expand(study)
    per_study, (tracker, runs, _) = found
    pooled, losses = pool_with_losses(cells, runs, study.baseline, tracker, study.claims)
    table = _claims_section(study, cells, runs, pooled, losses, tracker, per_study).removeprefix("\n### Claims\n\n")
    finished = sum(runs[c.id].info.status == "FINISHED" for c in cells if c.id in runs)
    partial = (f" **{finished} of its {len(cells)} cells have finished**: the verdicts below rest on those."
               if finished < len(cells) else "")
    return f"{_setup_paragraph(study, path, len(cells))}{partial}\n\n{table}"


def _first_run(study, path: str, args, workdirs: list[str]):
    """(the study's own arguments, its runs) from the first workdir where it ran, or None."""
    import argparse

    from workflows.study.errors import StudyError

    for workdir in workdirs:
        per_study = argparse.Namespace(**{**vars(args), "study": path, "format": "md", "workdir": workdir})
        try:
            return per_study, _runs(study, per_study)
        except StudyError:
            continue
    return None


def _setup_paragraph(study, path: str, num_cells: int) -> str:
    reports = sorted({c.report for c in study.claims if c.report})
    return (f"{study.description or study.name}. `{path}`: {len(study.routers)} routers x {len(study.models)} "
            f"models x {len(study.datasets)} datasets x seeds {', '.join(map(str, study.seeds))} ({num_cells} cells), "
            f"{study.training.steps} steps; claims from report{'s' if len(reports) > 1 else ''} "
            f"{', '.join(reports) or '—'}.")

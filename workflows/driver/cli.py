"""`moelab`: run, validate, inspect and aggregate routing studies.

Exit codes: 0 all cells finished, 1 some cells failed, 2 invalid input, 130 Ctrl-C, 143 SIGTERM (`ray job stop`).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator, TextIO

# Nothing heavy at import: torch, DeepSpeed and Ray load inside a command, once stdout is kept for its results.
from workflows.driver.calibration import cmd_calibrate
from workflows.driver.commands import cmd_run, cmd_tune, cmd_validate
from workflows.driver.readback import cmd_aggregate, cmd_findings, cmd_routers, cmd_status
from workflows.driver.workspace import DEFAULT_WORKDIR


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


class _Sigterm:
    """Whether SIGTERM arrived. It is raised as KeyboardInterrupt, so that the command's own interrupt handling
    (unfinished runs closed KILLED) runs for it; a flag, not an exception type, tells the exit code, because code
    between the handler and `main` (Ray's `ray.wait` among it) may raise a KeyboardInterrupt of its own."""
    received = False


def _raise_interrupt_for_sigterm(signum, frame) -> None:
    _Sigterm.received = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`ray job stop` sends the driver SIGTERM and SIGKILL 3 s later (RAY_JOB_STOP_WAIT_TIME_S), as does `kill PID`
    from a shell. Left to Ray's handler (installed by `ray.init`), the driver aborts with the study's MLflow runs left
    RUNNING; taken as an interrupt, they are closed KILLED and the same command resumes them. Only the main thread
    may install a handler (a caller running `main` in a thread keeps the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Sigterm.received = False  # a command run in-process after an earlier one that was terminated
    previous = signal.signal(signal.SIGTERM, _raise_interrupt_for_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_libraries() -> None:
    """Library notices that say nothing about the study stay out of the terminal (`--verbose` keeps them): DeepSpeed's
    "Setting accelerator to CPU" on every CPU machine, Ray's token-auth banner, MLflow's table creation. Their loggers
    exist before the libraries load: DeepSpeed resets its logger's level at import, but keeps a filter."""
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


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

    def seeds_option(c: argparse.ArgumentParser) -> None:
        c.add_argument("--seeds", metavar="3,4,5", help="the study on these seeds instead of its own, in the same "
                                                        "workdir (a replication; aggregate: its cells only)")

    def threads_option(c: argparse.ArgumentParser) -> None:
        c.add_argument("--threads", type=int, default=1, metavar="N",
                       help="torch threads for this command's own compute (default 1: beside a running study more "
                            "threads contend for its cores and run slower, measured 3x; on an idle machine more "
                            "speed up large inputs)")

    for name, fn, what in (("run", cmd_run, "run (or resume) a study"),
                           ("tune", cmd_tune, "run (or resume) the study's sweep with Ray Tune")):
        launch = command(name, fn, what)
        if name == "run":
            seeds_option(launch)
        launch.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
        launch.add_argument("--verbose", action="store_true",
                            help="stream Ray worker logs and library notices to the terminal")
        launch.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                            help="off a terminal: at most one progress line per running cell this often (default 10)")
    validate = command("validate", cmd_validate, "validate a study file only", workdir=False)
    validate.add_argument("--no-hub", action="store_true",
                          help="check everything but what only the Hugging Face hub can answer (a checkpoint's "
                               "config.json not in the local cache), and name each check skipped")
    routers = sub.add_parser("routers", help="the router registry, characterized on random hidden states (and, "
                                              "with --study, on a trained cell's)")
    routers.add_argument("--format", choices=("table", "json"), default="table")
    routers.add_argument("--study", help="a study with a finished MoE cell: also route its trained hidden states")
    routers.add_argument("--hidden-states", metavar="ENCODER",
                         help="also route a pretrained encoder's hidden states on the built-in domain corpus "
                              "(a folder, a cached hub name, or builtin:all-MiniLM-L6-v2, bundled offline)")
    routers.add_argument("--workdir", default=DEFAULT_WORKDIR)
    routers.add_argument("--tracking-uri")
    routers.add_argument("--storage-path")
    routers.add_argument("--tokens", type=int, default=4096)
    routers.add_argument("--d-model", type=int, default=256)
    routers.add_argument("--experts", type=int, default=8)
    routers.add_argument("--seeds", type=int, default=1,
                         help="initialize each router with this many seeds: means with 95%% intervals (3 or more)")
    threads_option(routers)
    routers.set_defaults(fn=cmd_routers)
    calibrate = command("calibrate", cmd_calibrate, "the knob value at which a trained dynamic router spends a "
                        "target number of experts per token (matched compute)")
    calibrate.add_argument("--router", required=True, metavar="LABEL", help="a dynamic router of the study, as its "
                           "table names it: top_p's p, top_any's threshold_offset, entropy_adaptive's entropy_scale")
    calibrate.add_argument("--target", type=float, required=True, metavar="EXPERTS",
                           help="experts per token to reach, e.g. a fixed-k router's k")
    calibrate.add_argument("--seed", type=int, help="the cell of this seed (default: the first finished one)")
    calibrate.add_argument("--tolerance", type=float, default=0.01, help="how close to the target (default 0.01)")
    calibrate.add_argument("--format", choices=("text", "json"), default="text")
    threads_option(calibrate)
    status = command("status", cmd_status, "one line per cell: state, step, loss")
    status.add_argument("--watch", action="store_true",
                        help="follow the running cells (step, loss, tokens/s, ETA) until the study ends")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between readings with --watch")
    seeds_option(status)
    agg = command("aggregate", cmd_aggregate, "print or write the comparison table")
    agg.add_argument("--format", choices=("md", "csv", "latex", "html"), default="md",
                     help="md: every cell, then seeds pooled; csv: one row per cell; latex, html: the pooled table")
    agg.add_argument("--out", help="write to this file instead of stdout")
    seeds_option(agg)
    agg.add_argument("--ratings", nargs="+", metavar="SHEET", help="filled rating sheets (the study's "
                     "*_rating_sheet.csv, scored 1-5): per-system means with 95%% intervals")
    agg.add_argument("--ratings-key", metavar="KEY", help="the sheets' key (default: the *_rating_key.csv beside "
                                                        "the first sheet's name, in the workdir)")
    agg.add_argument("--replicate", metavar="3,4,5", help="claims: also decide each claim on these seeds' cells, "
                                                          "side by side; a verdict stands only where both agree")
    findings = sub.add_parser("findings", help="the findings page: every study's claims table, one command")
    findings.add_argument("studies", nargs="+", help="study YAML files with claims:")
    findings.add_argument("--workdir", action="append", metavar="DIR",
                          help=f"where they ran; repeat it for studies run in different workdirs, each study read "
                               f"from the first where it ran (default: {DEFAULT_WORKDIR})")
    findings.add_argument("--tracking-uri")
    findings.add_argument("--storage-path")
    findings.add_argument("--replicate", metavar="3,4,5", help="also decide each claim on these seeds' cells")
    findings.add_argument("--out", help="write the page to this file instead of stdout")
    findings.add_argument("--out-dir", metavar="DIR",
                          help="one page per study that ran (others' pages left as they are) and an index.md (earlier "
                               "pages' rows kept)")
    findings.set_defaults(fn=cmd_findings)
    return p


def _dispatch(args, out: TextIO) -> int:
    from workflows.study.errors import StudyError

    try:
        return args.fn(args, out)
    except StudyError as err:  # found after parsing: missing domain labels, a cluster the study cannot use
        print(err, file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        _quiet_libraries()
    with _results_only_on_stdout() as out, _sigterm_as_interrupt():
        try:
            return _dispatch(args, out)
        except KeyboardInterrupt:
            return 128 + signal.SIGTERM if _Sigterm.received else 130


if __name__ == "__main__":
    raise SystemExit(main())

"""The Ray the driver uses: a local one of its own, or a cluster (--address / RAY_ADDRESS) checked before anything
is written."""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading

from workflows.driver.workspace import Workspace
from workflows.study.errors import StudyError


def check_cluster(ws: Workspace) -> None:
    """A multi-node cluster cannot use the driver's disk: refuse local tracking and node-local storage up front."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    problems = []
    if ws.is_local_tracking:
        problems.append(f"--tracking-uri: {ws.tracking_uri} is a file on the driver's disk, which workers on the "
                        f"other {len(nodes) - 1} node(s) cannot write; start `mlflow server --backend-store-uri ... "
                        "--artifacts-destination ... --host 0.0.0.0` and pass --tracking-uri http://HOST:5000")
    if ws.shared_storage is None:
        problems.append(f"--storage-path: checkpoints and prepared data would go to {ws.root}, node-local on a "
                        f"{len(nodes)}-node cluster; pass --storage-path on storage every node reaches: an NFS/EFS mount "
                        "or an object-store URI (s3://bucket/dir, gs://...)")
    if problems:
        raise StudyError("cluster", problems)


def connect_if_remote(ws: Workspace, address: str | None, verbose: bool) -> None:
    """Join an existing cluster (--address or RAY_ADDRESS, as under `ray job submit`) and check it can run the
    study before anything is written; a local Ray (no address) is started lazily, only if cells remain."""
    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address, verbose)
        check_cluster(ws)


# Ray Train's controller polls its workers every 2 s by default: a cell's start and end each wait up to one poll.
# Measured on the quickstart (2 cores): 3.7-4.9 s from a cell's last step to fit() returning at 2 s, 0.9-1.2 s at
# 0.25 s. Ray Train propagates the variable from the process that calls fit() to its controller.
RAY_TRAIN_POLLING = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# A Ray of our own is one node, which no cloud provider drains: Ray Train's preemption watcher (an actor, hence one
# more Python process per cell) would watch for nothing. Clusters keep it, and so does a user who sets the variable.
LOCAL_RAY_TRAIN = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session logs unless asked for: a failed cell's error reaches the driver anyway.
    # Workers must import moelab's packages; a cluster gets them through `ray job submit --working-dir`.
    # The dashboard stays on: Ray Train's PlacementGroupCleaner needs the State API to free the workers of a
    # trial that Tune stopped early (without it, ASHA-stopped trials leak their CPUs).
    # No address and no RAY_ADDRESS: a Ray of our own ("local"), never one left running on this machine, which
    # `ray.init()` would otherwise find through /tmp/ray and join.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # A Ray of our own gets a free dashboard port: with Ray's fixed 8265 a second study on the same machine would
    # start without a dashboard, and its ASHA-stopped trials would leak their CPUs (see above).
    dashboard = {"dashboard_port": _free_port()} if address == "local" else {}
    env_vars = {"PYTHONWARNINGS": "ignore::DeprecationWarning", **RAY_TRAIN_POLLING,
                **({k: v for k, v in LOCAL_RAY_TRAIN.items() if k not in os.environ} if address == "local" else {})}
    caller_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose, **dashboard,
             runtime_env={"env_vars": env_vars})
    _give_sigterm_back(caller_sigterm)
    if not verbose:
        _drop_worker_pool_notices()


def _give_sigterm_back(caller_handler) -> None:
    """`ray.init` replaces the process's SIGTERM handler with its own, which kills the Ray it started and calls
    sys.exit from inside whatever the driver was doing: the core worker then aborts (SIGABRT) on its lost raylet, and
    the study's MLflow runs stay RUNNING. A caller that installed a handler of its own (the CLI's, which takes SIGTERM
    as Ctrl-C) gets it back; Ray's stays where the caller had none."""
    if callable(caller_handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, caller_handler)


# The raylet's notice when it has started more Python workers than its startup concurrency (the CPU count) times 4.
# A sweep starts three actors per trial (the trial, its Ray Train controller, its worker), so on a small machine it
# always fires, and its advice (fewer actors, fractional CPUs) does not apply to a study.
WORKER_POOL_NOTICE = "PYTHON worker processes have been started on node"


def _drop_worker_pool_notices() -> None:
    """Ray prints the raylet's notices through `print_to_stdstream`, called from its error-listener thread by module
    name: wrapping that one function keeps this notice out and lets every other one through."""
    from ray._private import worker as ray_worker

    printer = ray_worker.print_to_stdstream
    if getattr(printer, "drops_worker_pool_notices", False):
        return

    def print_without_worker_pool_notices(data, ignore_prefix: bool):
        lines = [line for line in data.get("lines", []) if WORKER_POOL_NOTICE not in line]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix)

    print_without_worker_pool_notices.drops_worker_pool_notices = True
    ray_worker.print_to_stdstream = print_without_worker_pool_notices

"""Shared fixtures."""
import pytest


@pytest.fixture
def in_process_ray():
    """For tests that call `main([...])` in this process (it starts Ray here): shut Ray down afterwards so later
    tests start their own cluster instead of inheriting this one's CPUs."""
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def stop_what_the_session_started_in_process():
    """An in-process Ray or torch.distributed group still up at interpreter exit is torn down by atexit hooks during
    finalization, where Ray's core-worker threads can take the process down after every test passed (SIGSEGV).
    Stop both at the end of the session, while the interpreter is whole."""
    import sys

    yield
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

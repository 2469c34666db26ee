"""Shared fixtures."""
import pytest


@pytest.fixture
def in_process_ray():
    """For tests that call `main([...])` in this process (it starts Ray here): shut Ray down afterwards so later
    tests start their own cluster instead of inheriting this one's CPUs."""
    import ray

    yield
    ray.shutdown()

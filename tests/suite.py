"""Which tests CI runs. The suite is the fast tests plus a bounded subset of the end-to-end (`slow`) ones; an
end-to-end run that CI leaves out is marked `extended` and names the CI tests that cover its behaviour piece by
piece. `bash scripts/test.sh` runs all but the extended runs; `bash scripts/test.sh --all` runs everything.
tests/test_suite.py checks that every name given here is a test that CI runs."""
import pytest


def extended(*covered_by: str) -> pytest.MarkDecorator:
    """Mark an end-to-end test that CI leaves out. `covered_by`: "path/to/test_file.py::test_name" of each CI test
    that covers a part of what it checks whole."""
    return pytest.mark.extended(covered_by=covered_by)

"""`moelab --help` and `moelab validate` answer without importing torch, DeepSpeed, Ray or MLflow (checked in a fresh
interpreter's sys.modules, not by the clock), and the torch-free registries the validator reads name exactly what
the worker side registers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "deepspeed", "ray", "mlflow", "transformers", "scipy", "pandas", "numpy")
PROBE = """
import json, sys
from workflows.driver.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["validate", "--help"],
                                  ["validate", "studies/quickstart.yaml"], ["validate", "studies/testbed_scope.yaml"],
                                  ["validate", "studies/summarization.yaml"]], ids=" ".join)
def test_help_and_validate_import_no_heavy_library(argv):
    result = probe(*argv)
    assert result["code"] == 0 and result["heavy"] == []


def test_a_bad_study_fails_with_exit_2_without_importing_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nrouters: [{name: topk, k: 0}]\nmodels: [{name: gpt}]\ndatasets: [{name: 'builtin:domains'}]\n")
    result = probe("validate", str(bad))
    assert result["code"] == 2 and result["heavy"] == []


def test_the_light_registries_name_what_the_worker_side_registers():
    from moe_models.assignment import ASSIGNMENTS
    from moe_models.balancing import BALANCING_LOSSES
    from moe_models.dispatch import DISPATCH_BACKENDS
    from moe_models.models import MODELS
    from moe_models.routers import ROUTER_OPTIONS, ROUTERS

    for registry in (ASSIGNMENTS, BALANCING_LOSSES, DISPATCH_BACKENDS, ROUTERS):
        for name in registry.names():
            assert registry.get(name) is not None  # its declared module registers it under that name
    assert ROUTERS.names() == ROUTER_OPTIONS.names()
    for name in ROUTERS.names():
        router = ROUTERS.get(name)
        assert router.Options is ROUTER_OPTIONS.get(name)
        assert (router.causal, router.needs_domains) == (router.Options.causal, router.Options.needs_domains)
    assert not ROUTERS.get("expert_choice").causal and ROUTERS.get("reference").needs_domains
    for name in MODELS.names():
        assert callable(MODELS.get(name).build)

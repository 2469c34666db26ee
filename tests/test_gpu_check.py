"""bench/gpu_check.sh, rehearsed on CPU (issue 42): the one call that spends the GPU machine's 15 minutes must not fail
on a typo, an unknown contender, a missing file or a wrong output layout. Its --dry-run runs everything but the CUDA
work, with a bundle made here (one module, this Python) in place of .gpu/site.tar.xz."""
import json
import re
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
OUT_FILES = {"summary.json", "steps.log", "cuda_tests.log", "study.log", "study_table.md", "moe_layer.json",
             "model_step.json"}
STEPS = ["install", "env", "cuda_tests", "moe_layer", "study", "model_step", "compiled"]


def bundle(tmp_path: Path) -> Path:
    """A bundle as bench/gpu_bundle.sh lays it out: packages at the root, moelab_bundle.json naming what to import."""
    site = tmp_path / "site"
    (site / "gpu_check_probe").mkdir(parents=True)
    (site / "gpu_check_probe" / "__init__.py").write_text("__version__ = '7'\n")
    (site / "moelab_bundle.json").write_text(json.dumps(
        {"python": "%d.%d" % sys.version_info[:2], "modules": ["gpu_check_probe"]}))
    path = tmp_path / "site.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        for item in site.iterdir():
            tar.add(item, arcname=item.name)
    return path


def gpu_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--python", sys.executable, *args],
                          capture_output=True, text=True, timeout=300)
    return done, out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    return gpu_check(tmp_path, "--dry-run", "--bundle", str(bundle(tmp_path)))


def test_the_dry_run_passes_every_step_and_leaves_the_documented_files(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == OUT_FILES  # the device tool brings back 8 files at most
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert [s["step"] for s in summary["steps"]] == STEPS
    assert {s["status"] for s in summary["steps"]} == {"ok"}


def test_the_bundle_is_unpacked_fresh_and_imported_from_there(dry_run):
    _, out = dry_run
    install = json.loads((out / "summary.json").read_text())["steps"][0]
    assert re.search(r"gpu_check_probe 7 from /tmp/[^ ]+/site/gpu_check_probe/__init__\.py", "\n".join(install["log_tail"]))


def test_the_dry_run_checks_what_the_gpu_call_will_run(dry_run):
    _, out = dry_run
    layer = json.loads((out / "moe_layer.json").read_text())
    assert layer["dry_run"] and layer["shapes"] == [[16384, 1024, 4096, 8, 2], [16384, 1024, 1024, 32, 4]]
    assert layer["backends"] == ["grouped", "deepspeed"]
    step = json.loads((out / "model_step.json").read_text())
    assert step["contenders"] == ["dense", "topk/grouped"] and step["eager_and_compiled"]
    assert re.search(r"\n\d+ tests collected", (out / "cuda_tests.log").read_text())
    study = (out / "study.log").read_text()
    assert "studies/gpu_smoke.yaml: valid — 4 cells" in study
    assert "studies/gpu_smoke_compiled.yaml: valid — 1 cells" in study


def test_a_typo_in_a_benchmark_call_fails_on_cpu():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "model_step.py"), "--dry-run", "--only", "dense",
                           "topk/groupd"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown contenders ['topk/groupd']" in done.stderr


@pytest.mark.parametrize("args,message", [
    (["--budjet", "100"], "unknown argument --budjet"),
    (["--budget", "8m"], "--budget takes whole seconds"),
    (["--bundle", "/nonexistent/site.tar.xz"], "no bundle at /nonexistent/site.tar.xz"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, args, message):
    done, out = gpu_check(tmp_path, "--dry-run", *args)
    assert done.returncode == 2 and message in done.stderr
    assert not out.exists()


def test_a_step_the_budget_cannot_hold_is_skipped_and_fails_the_call(tmp_path):
    done, out = gpu_check(tmp_path, "--dry-run", "--bundle", str(bundle(tmp_path)), "--budget", "15")
    assert done.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(STEPS)


def test_the_carried_packages_are_pinned_at_the_versions_ci_installs():
    pins = dict(line.split("==") for line in (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert {"ray", "mlflow", "deepspeed", "datasets", "evaluate", "pydantic"} <= set(pins)
    assert {name: version for name, version in pins.items() if metadata.version(name) != version} == {}

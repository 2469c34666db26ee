"""The layout says where code runs, and imports never run back up it: study <- cell (a worker) <- driver, and the
report reads what MLflow holds. A worker module never imports the driver or the report."""
import ast
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
MAY_NOT_IMPORT = {
    "study": ("workflows.driver", "workflows.cell", "workflows.report"),
    "cell": ("workflows.driver", "workflows.report"),
    "report": ("workflows.driver", "workflows.cell"),
}


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_no_import_runs_back_up_the_layout(package):
    banned = MAY_NOT_IMPORT[package]
    back = {f"{path.name} -> {module}" for path in (WORKFLOWS / package).glob("*.py")
            for module in imported_modules(path) if module.startswith(banned)}
    assert not back


def test_shared_modules_import_no_layer():
    """tracking, storage, provenance, figures and metric_names serve every layer, so they import none."""
    layers = tuple(f"workflows.{p}" for p in ("study", "driver", "cell", "report"))
    for name in ("tracking", "storage", "provenance", "figures", "metric_names"):
        assert not {m for m in imported_modules(WORKFLOWS / f"{name}.py") if m.startswith(layers)}, name

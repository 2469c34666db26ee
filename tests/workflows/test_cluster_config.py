"""cluster.yaml is a real Ray cluster-launcher config: it passes Ray's own schema validation."""
from pathlib import Path

import pytest
import yaml
from jsonschema.exceptions import ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def launcher_config() -> dict:
    return prepare_config(yaml.safe_load(CLUSTER_YAML.read_text()))  # Ray's defaults filled in, as `ray up` does


def test_cluster_yaml_passes_rays_schema_and_installs_moelab_on_every_node():
    config = launcher_config()
    validate_config(config)  # raises on any schema violation
    assert config["head_node_type"] in config["available_node_types"]
    assert any("pip install" in cmd and "moelab" in cmd for cmd in config["setup_commands"])
    assert any("--dashboard-host=0.0.0.0" in cmd for cmd in config["head_start_ray_commands"])  # job submission


def test_the_schema_check_is_not_vacuous():
    config = launcher_config()
    config["available_node_types"]["head"]["max_workerz"] = 1
    with pytest.raises(ValidationError, match="max_workerz"):
        validate_config(config)

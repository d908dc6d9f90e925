"""The cluster-launcher config and what a Ray job uploads (the jobs themselves: test_multinode.py)."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO


def test_cluster_config_passes_rays_own_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # raises on any schema violation
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # a typo the schema must catch
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "ray start" in c)


def test_rayignore_keeps_data_results_and_venvs_out_of_the_job() -> None:
    ignored = (REPO / ".rayignore").read_text().split()
    for entry in ("/.venv/", "/results/", "/data/", "/wandb/"):
        assert entry in ignored

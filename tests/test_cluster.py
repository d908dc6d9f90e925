"""The search as a Ray job on a real local head (token auth on), and the cluster-launcher config."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cluster_helpers import RAY, Cluster, cluster_env
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


def test_demo_search_as_a_ray_job_on_a_token_auth_head(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, cluster_env(tmp_path))
    results = tmp_path / "results"
    try:
        cluster.start_head(cpus=2)
        submit = cluster.submit(
            [
                "--demo",
                "--num-samples",
                "2",
                "--max-epochs",
                "1",
                "--set",
                "backbone=resnet18",
                "--set",
                "image_size=32",
                "--cpus-per-trial",
                "1",
                "--results",
                str(results),
                "--name",
                "job",
                "--quiet",
                "--no-wandb",
            ],
            timeout=600,
        )
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
        assert "succeeded" in (submit.stdout + submit.stderr)
        assert "Leaderboard: top 2 of 2 trials" in submit.stdout
        trials = pd.read_parquet(results / "job" / "trials.parquet")
        epochs = pd.read_parquet(results / "job" / "epochs.parquet")
        assert len(trials) == 2 and (trials["status"] == "completed").all()
        assert len(epochs) == 2 and (epochs["epoch"] == 1).all()
        unauthenticated = subprocess.run(
            [RAY, "job", "list", "--address", cluster.dashboard],
            capture_output=True,
            text=True,
            env={k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"},
            timeout=60,
        )
        assert unauthenticated.returncode != 0  # the head refuses callers without the token
    finally:
        cluster.stop()

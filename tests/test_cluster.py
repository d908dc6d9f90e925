"""The search as a Ray job on a real local head (token auth on), and the cluster-launcher config."""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO

RAY = str(Path(sys.executable).parent / "ray")


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


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, "ray start exited"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:  # answering, if only to say 401: it is up
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("the Ray head did not come up")


def _stop(head: subprocess.Popen) -> None:
    """Stop only what this test started: the head's own process group."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)


def test_demo_search_as_a_ray_job_on_a_token_auth_head(tmp_path: Path) -> None:
    gcs, dashboard, client, agent_http, agent_grpc, metrics, node_manager, object_manager, runtime_env = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "TUNE_INAT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            f"--runtime-env-agent-port={runtime_env}",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    results = tmp_path / "results"
    try:
        _wait_for_dashboard(address, head)
        submit = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO),
                "--",
                sys.executable,
                "-m",
                "tune_inat.search",
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
            env=env,
            capture_output=True,
            text=True,
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
            [RAY, "job", "list", "--address", address],
            capture_output=True,
            text=True,
            env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"},
            timeout=60,
        )
        assert unauthenticated.returncode != 0  # the head refuses callers without the token
    finally:
        _stop(head)
        log.close()

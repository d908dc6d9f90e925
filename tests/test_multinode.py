"""Scale-out on a real multi-node Ray cluster on this machine: trials spread, per-node caches, node loss, resume.

A head and worker nodes started with `ray start` (own ports, token auth, one CPU each so trials must
spread); the demo search submitted as a Ray job. The experiment storage is one folder every node
uses (they share this machine's disk, as nodes share NFS). Each node keeps its own image cache
(`TUNE_INAT_NODE_CACHE`), so the per-node build really happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from cluster_helpers import RAY, Cluster, cluster_env, job_id
from crash_helpers import assert_complete, written_epochs

from tune_inat.lock import OWNER_FILE

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

SEARCH = [
    "--demo",
    "--scheduler",
    "fifo",
    "--no-reproducible",
    "--set",
    "backbone=resnet18",
    "--set",
    "image_size=32",
    "--cpus-per-trial",
    "1",
    "--no-wandb",
    "--quiet",
]


def _wait(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.5)


def test_trials_spread_over_nodes_each_with_its_own_cache_and_survive_a_lost_node(tmp_path: Path) -> None:
    from ray import tune

    cluster = Cluster(tmp_path, cluster_env(tmp_path))
    results = tmp_path / "results"
    try:
        cluster.start_head(cpus=1, env={"TUNE_INAT_NODE_CACHE": str(tmp_path / "cache-head")})
        cluster.add_worker("worker-a", cpus=1, env={"TUNE_INAT_NODE_CACHE": str(tmp_path / "cache-a")})
        doomed = cluster.add_worker("worker-b", cpus=1, env={"TUNE_INAT_NODE_CACHE": str(tmp_path / "cache-b")})
        job = cluster.submit(
            [
                *SEARCH,
                "--num-samples",
                "4",
                "--max-epochs",
                "4",
                "--max-failures",
                "2",
                "--results",
                str(results),
                "--name",
                "spread",
            ],
            wait=False,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        folder = results / "spread"
        # three trials at once need all three one-CPU nodes: once epochs are reported, worker b runs one
        _wait(lambda: sum(map(len, written_epochs(folder).values())) >= 3)
        doomed.kill()  # a node lost mid-search (its own processes only)
        final, logs = cluster.wait_for_job(job_id(job))
        assert final == "SUCCEEDED", logs[-3000:]
        assert "Leaderboard: top 4 of 4 trials" in logs, logs[-3000:]
        assert_complete(folder, 4, 4)  # no epoch lost or doubled, node loss or not
        trials = pd.read_parquet(folder / "trials.parquet")
        assert trials["node_id"].nunique() >= 2  # the trials ran on several nodes
        assert trials["device_name"].notna().all() and trials["node_host"].notna().all()
        retried = [t for t in tune.ExperimentAnalysis(str(folder)).trials if t.run_metadata.num_failures > 0]
        assert retried  # the lost node's trial failed there, and went on elsewhere from its checkpoint
        for node_cache in ("cache-head", "cache-a"):  # every node that ran trials built its own image cache
            assert list((tmp_path / node_cache).glob("*px-*img-*/meta.json")), node_cache
    finally:
        cluster.stop()


def test_an_interrupted_search_resumes_on_a_fresh_cluster(tmp_path: Path) -> None:
    results = tmp_path / "results"
    arguments = [*SEARCH, "--num-samples", "3", "--max-epochs", "3", "--results", str(results), "--name", "moved"]
    first = Cluster(tmp_path, cluster_env(tmp_path))
    try:
        first.start_head(cpus=1)
        first.add_worker("worker", cpus=1)
        job = first.submit(arguments, wait=False)
        assert job.returncode == 0, job.stderr[-3000:]
        _wait(lambda: sum(map(len, written_epochs(results / "moved").values())) >= 2)
    finally:
        # the whole cluster goes down mid-search, driver and all: the job's driver runs in its own session (Ray
        # starts it so), so it is ended by its own id, which the search's lock file records
        driver = json.loads((results / "moved" / OWNER_FILE).read_text())["pid"]
        for node in reversed(first.nodes):
            node.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(driver, signal.SIGKILL)
        first.stop()  # its temp folders
    second = Cluster(tmp_path, cluster_env(tmp_path))
    try:
        second.start_head(cpus=1)
        second.add_worker("worker-2", cpus=1)
        resumed = second.submit([*arguments, "--resume"])
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert "succeeded" in resumed.stdout + resumed.stderr  # Ray's verdict on the job, from `ray job submit`
        assert "Leaderboard: top 3 of 3 trials" in resumed.stdout
        assert_complete(results / "moved", 3, 3)
        unauthenticated = subprocess.run(
            [RAY, "job", "list", "--address", second.dashboard],
            capture_output=True,
            text=True,
            env={k: v for k, v in second.env.items() if k != "RAY_AUTH_MODE"},
            timeout=60,
        )
        assert unauthenticated.returncode != 0  # the head refuses callers without the token
    finally:
        second.stop()

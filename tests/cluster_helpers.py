"""Real Ray clusters on this machine for the tests: a head and worker nodes from `ray start`, on 127.0.0.1.

Every node is its own `ray start --block` process group, with its own ports and its own temp folder
(as on separate machines: nodes sharing one would share, and garbage-collect, each other's copies
of the job's working directory), token authentication on. Tests stop only what they started: each node's own
process group, by its id (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@dataclass
class Node:
    process: subprocess.Popen
    log: Path
    temp_dir: str

    def stop(self, wait: float = 20) -> None:
        """End this node: its own process group (the raylet, its workers, for a head the GCS and dashboard)."""
        for sig, patience in ((signal.SIGTERM, wait), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=patience)
                time.sleep(1)
                return
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        """The node dies at once, as a machine that loses power."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.process.wait(timeout=30)


@dataclass
class Cluster:
    """A head and its worker nodes; `env` is what every node (and so every trial on it) sees."""

    workdir: Path
    env: dict[str, str]
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, arguments: list[str], cpus: int, env: dict[str, str]) -> Node:
        node_manager, object_manager, metrics, agent_http, agent_grpc, runtime_env = free_ports(6)
        temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths have a length limit
        command = [
            RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
            f"--temp-dir={temp}", "--disable-usage-stats", *arguments,
        ]  # fmt: skip
        log = self.workdir / f"{name}.log"
        process = subprocess.Popen(
            command, env={**self.env, **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        node = Node(process, log, temp)
        self.nodes.append(node)
        return node

    def start_head(self, cpus: int = 1, env: dict[str, str] | None = None) -> Node:
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        head = self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client}",
            ],
            cpus,
            env or {},
        )
        self._wait_for_dashboard(head)
        return head

    def add_worker(self, name: str, cpus: int = 1, env: dict[str, str] | None = None) -> Node:
        node = self._start(name, [f"--address=127.0.0.1:{self.gcs_port}"], cpus, env or {})
        self.wait_for_nodes(len(self.nodes))
        return node

    def _wait_for_dashboard(self, head: Node, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert head.process.poll() is None, head.log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2):
                    return
            except urllib.error.HTTPError:  # answering, if only to say 401: it is up
                return
            except OSError:
                time.sleep(1)
        raise AssertionError("the Ray head did not come up")

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = subprocess.run(
                [RAY, "status", f"--address=127.0.0.1:{self.gcs_port}"],
                capture_output=True,
                text=True,
                env=self.env,
                timeout=60,
            )
            if status.stdout.count(" node_") >= count:
                return
            time.sleep(2)
        raise AssertionError(f"{count} nodes did not join in {timeout} s")

    def submit(self, arguments: list[str], wait: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir REPO -- python -m tune_inat.search ARGUMENTS` (its id in `job_id(...)`)."""
        from conftest import REPO

        command = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--working-dir",
            str(REPO),
            *([] if wait else ["--no-wait"]),
            "--",
            sys.executable,
            "-m",
            "tune_inat.search",
            *arguments,
        ]
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def wait_for_job(self, job_id: str, timeout: float = 900) -> tuple[str, str]:
        """(final status, the job's logs) of a job submitted with wait=False."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = subprocess.run(
                [RAY, "job", "status", "--address", self.dashboard, job_id],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            status = status.stdout + status.stderr  # Ray's CLI prints the verdict on either
            ended = re.search(rf"Job '{job_id}' (succeeded|failed|stopped)", status, re.IGNORECASE)
            if ended:
                final = ended.group(1).upper()
                logs = subprocess.run(
                    [RAY, "job", "logs", "--address", self.dashboard, job_id],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                return final, logs.stdout
            time.sleep(2)
        raise AssertionError(f"job {job_id} did not end in {timeout} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.nodes.clear()


def cluster_env(workdir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "PYTHONUNBUFFERED": "1",
        "TUNE_INAT_CACHE": str(workdir / "driver-cache"),
    }
    env.pop("RAY_ADDRESS", None)
    return env


def job_id(submitted: subprocess.CompletedProcess) -> str:
    return next(word.strip("'\"") for word in submitted.stdout.split() if word.strip("'\"").startswith("raysubmit_"))

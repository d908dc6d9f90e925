"""A running local search: its own Ray, what it listens on, and that a client without its token is refused even when
the environment disables Ray's token authentication (RAY_AUTH_MODE=disabled, as older guides set it); and its
Optuna study (results/<name>/optuna.db), read by Optuna while the search runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
from conftest import REPO

CLIENT = """
import sys, ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
except Exception as err:
    print("refused:", type(err).__name__)
else:
    print("connected:", int(ray.cluster_resources().get("CPU", 0)))
    ray.shutdown()
"""


def listening(pid: int) -> dict[str, set[str]]:
    """Each process under `pid` that listens on TCP: its name -> the addresses ('*' for every interface)."""
    found: dict[str, set[str]] = {}
    for process in psutil.Process(pid).children(recursive=True):
        try:
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    host = connection.laddr.ip if connection.laddr.ip not in ("", "::") else "*"
                    found.setdefault(process.name(), set()).add(f"{host}:{connection.laddr.port}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def client(address: str, home: Path, **auth: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), **auth)
    return subprocess.run(
        [sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True, timeout=120, cwd=home
    )


def test_a_running_search_refuses_a_client_without_its_token_and_its_study_reads_live(
    tmp_path: Path, demo_root: Path
) -> None:
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    home.mkdir()
    stranger.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    command = ["--data", str(demo_root), "--space", "demo", "--num-samples", "2", "--no-wandb", "--name", "live"]
    command += ["--results", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]
    search = subprocess.Popen(
        [sys.executable, "-m", "tune_inat.search", *command],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while "gcs_server" not in (sockets := listening(search.pid)) and search.poll() is None:
            assert time.monotonic() < deadline, "the search's Ray never started"
            time.sleep(0.5)
        time.sleep(2)  # the raylet and agents start just after the GCS
        sockets = listening(search.pid)
        (gcs,) = sockets["gcs_server"]
        assert gcs.startswith("*:"), sockets  # Ray 2.60 listens on every interface: the token is the guard
        address = f"127.0.0.1:{gcs.rpartition(':')[2]}"

        refused = client(address, stranger, RAY_AUTH_MODE="disabled")
        assert refused.stdout.startswith("refused:"), (refused.stdout, refused.stderr[-2000:])
        assert "InvalidAuthToken" in refused.stderr

        token = home / ".ray" / "auth_token"
        invited = client(address, stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        assert invited.stdout.startswith("connected:"), (invited.stdout, invited.stderr[-2000:])
        study, running = None, []
        while not running and search.poll() is None:  # a trial still running, its epochs already in the study
            if (tmp_path / "results" / "live" / "optuna.db").exists():
                study = optuna.load_study(study_name="live", storage=f"sqlite:///{tmp_path}/results/live/optuna.db")
                running = [t for t in study.trials if t.state.name == "RUNNING" and t.intermediate_values]
            time.sleep(0.5)
        assert running, "no trial was seen running with its epochs in the study"
        assert search.poll() is None, "the search ended before both clients tried: the check proves nothing"
        search.send_signal(signal.SIGINT)  # the point is made; Ctrl-C ends the search (tested in test_resume)
        _, err = search.communicate(timeout=300)
    finally:
        if search.poll() is None:
            search.kill()
            search.wait()
    assert search.returncode == 130, err[-3000:]
    assert err.count("RAY_AUTH_MODE=disabled is not used for the search's own local Ray") == 1, err[-3000:]
    assert "Traceback" not in err

"""`terrahash serve` stops on SIGTERM (what systemd and Kubernetes send) as on Ctrl-C: it answers, exits 0,
prints no stack dump, and leaves none of the processes it started (Ray, its agents, the HTTP ingress)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_stops_serving_cleanly_and_leaves_no_process(built_index, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, as on a server
    server = subprocess.Popen([sys.executable, "-m", "cluster.cli.main", "serve", "--index", str(built_index["root"]),
                               "--port", str(port), "--shard-replicas", "1"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        url = f"http://127.0.0.1:{port}/v1/search/text"
        deadline = time.monotonic() + 240
        while True:
            try:
                request = urllib.request.Request(url, json.dumps({"query": "a river", "k": 3}).encode(),
                                                 {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as answer:
                    assert len(json.loads(answer.read())["results"]) == 3
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "terrahash serve did not answer"
                time.sleep(1)
        started = psutil.Process(server.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)  # it runs a Ray of its own
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert server.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Fatal Python error" not in output, output[-3000:]
    deadline = time.monotonic() + 30
    while [p for p in started if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [" ".join(p.cmdline())[:80] for p in started if _alive(p)]
    assert left == [], left


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

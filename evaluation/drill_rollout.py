"""The alias drill: promote a model version under load, then roll it back, and measure what clients saw.

Steps (figures, not a timed test):

1. a registry: ``--tracking-uri``, else a real MLflow server started here (SQLite, a temporary folder);
   ``--model DIR`` (exported students) registered twice as versions of ``--name``, the first given the
   alias ``champion``;
2. the Serve app over ``--index`` (an artifact root built with that model: the versions share its code
   space) with one arm, ``models:/NAME@champion``, which follows its alias (serving/lifecycle/follow.py);
3. text queries at ``--rate`` per second from ``--clients`` threads on keep-alive connections, for the
   whole drill: ``--steady`` seconds, the second version promoted to ``champion``, ``--steady`` seconds
   after the arm serves it, `rollback`, ``--steady`` seconds after the first one is back;
4. the report: requests and failures per phase, p50/p99 latency, seconds from each alias move to the
   first answer of the new version and to the roll-out's end (every router on it), whether any answer
   went back to the old version once the new one answered, the audit log's entries and its chain.

Run: ``python -m evaluation.drill_rollout --model runs/fast_split-64/students/onnx --index
runs/fast_split-64/index [--json out.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

QUERIES = ["many planes parked next to a long building", "a river running through a forest",
           "boats at a pier next to a road lined with trees", "a baseball field beside a parking lot",
           "dense houses along curved streets", "a freeway interchange with green fields"]


def start_mlflow(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on a free loopback port."""
    from tests.conftest import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'db.sqlite'}",
         "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=env, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/health", 120)
    return process, url


def wait_ok(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready within {timeout:.0f} s")
        time.sleep(0.5)


def register_twice(tracking_uri: str, folder: Path, name: str) -> list[str]:
    """``folder`` logged as a run's ``onnx/`` artifacts and registered as two versions of ``name``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("alias-drill") or client.get_experiment(
        client.create_experiment("alias-drill"))
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    versions = []
    for _ in range(2):
        run = client.create_run(experiment.experiment_id)
        client.log_artifacts(run.info.run_id, str(folder), "onnx")
        client.set_terminated(run.info.run_id)
        versions.append(client.create_model_version(name, f"{run.info.artifact_uri}/onnx",
                                                    run_id=run.info.run_id).version)
    return versions


class Clients:
    """``clients`` threads sending text queries at ``rate`` per second in all, each answer recorded as
    (time, status, model, seconds)."""

    def __init__(self, url: str, rate: float, clients: int):
        self.url, self.period = url, clients / rate
        self.answers: list[tuple[float, int, str | None, float]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, n: int) -> None:
        import http.client

        host, port = self.url.split("//", 1)[1].split("/", 1)[0].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        next_at = time.monotonic() + self.period * n / len(self.threads)
        i = 0
        while not self.stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.period
            body = json.dumps({"query": QUERIES[(n + i) % len(QUERIES)], "k": 10})
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/search/text", body, {"content-type": "application/json",
                                                                     "X-Client-Id": f"drill-{n}"})
                answer = connection.getresponse()
                status, data = answer.status, json.loads(answer.read() or b"{}")
            except (OSError, ValueError, http.client.HTTPException):
                status, data = 0, {}
                connection.close()
            with self.lock:
                self.answers.append((time.time(), status, data.get("model"), time.perf_counter() - start))
            i += 1

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def first(self, model: str, after: float, timeout: float) -> float:
        """When the first answer from ``model`` after ``after`` came (waits up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [t for t, status, m, _ in self.answers if t >= after and m == model]
            if found:
                return found[0]
            time.sleep(0.1)
        raise TimeoutError(f"no answer from {model} within {timeout:.0f} s")


def traffic(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/traffic", timeout=10) as answer:
        return json.loads(answer.read())["arms"]["champion"]


def settled(url: str, model: str, timeout: float) -> dict:
    """The arm's status once its roll-out to ``model`` is done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        arm = traffic(url)
        if (arm.get("rollout") or {}).get("to") == model and arm["rollout"]["state"] in ("done", "failed"):
            return arm
        time.sleep(0.2)
    raise TimeoutError(f"the roll-out to {model} did not end within {timeout:.0f} s")


def phase(answers: list, start: float, end: float) -> dict:
    rows = [a for a in answers if start <= a[0] < end]
    ok = [a[3] * 1000 for a in rows if a[1] == 200]
    return {"requests": len(rows), "failed": sum(a[1] != 200 for a in rows),
            "p50_ms": round(float(np.percentile(ok, 50)), 1) if ok else None,
            "p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
            "models": sorted({str(a[2]) for a in rows})}


def drill(args, workdir: Path, tracking_uri: str) -> dict:
    import ray
    from ray import serve

    from serving.app import ServeSettings, deploy_local
    from serving.governance.audit import AuditLog
    from serving.lifecycle.promotion import promote, rollback
    from tests.conftest import free_port

    first, second = register_twice(tracking_uri, Path(args.model), args.name)
    root = str(workdir / "root")
    promote(args.name, first, "champion", root=root, tracking_uri=tracking_uri, force=True,
            reason="the drill's first champion")
    model = {v: f"models:/{args.name}/{v}" for v in (first, second)}
    settings = ServeSettings.from_dict({
        "index": str(Path(args.index).resolve()), "tracking_uri": tracking_uri,
        "model_cache_dir": str(workdir / "models"), "shard_cache_dir": str(workdir / "shards"),
        "arms": [{"name": "champion", "model": f"models:/{args.name}@champion", "weight": 100.0}],
        "canary": {"root": root, "alias_poll_s": args.poll}})
    port = free_port()
    deploy_local(settings, port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(f"{url}/v1/readyz", 300)
        marks = {"start": time.time()}
        with Clients(url, args.rate, args.clients) as clients:
            time.sleep(args.steady)
            marks["promote"] = time.time()
            promote(args.name, second, "champion", root=root, tracking_uri=tracking_uri, force=True,
                    reason="the alias drill")
            marks["first_new"] = clients.first(model[second], marks["promote"], args.timeout)
            out = settled(url, model[second], args.timeout)
            marks["promoted"] = time.time()
            time.sleep(args.steady)
            marks["rollback"] = time.time()
            rollback(args.name, "champion", root=root, tracking_uri=tracking_uri, reason="the alias drill's rollback")
            marks["first_old"] = clients.first(model[first], marks["rollback"], args.timeout)
            back = settled(url, model[first], args.timeout)
            marks["rolled_back"] = time.time()
            time.sleep(args.steady)
            marks["end"] = time.time()
        answers = sorted(clients.answers)
    finally:
        serve.shutdown()
        ray.shutdown()
    served = [a[2] for a in answers if a[1] == 200]
    switches = [m for n, m in enumerate(served) if n == 0 or m != served[n - 1]]
    audit = AuditLog(root, args.name)
    return {
        "versions": model, "rate": args.rate, "clients": args.clients,
        "phases": {"before": phase(answers, marks["start"], marks["promote"]),
                   "promotion": phase(answers, marks["promote"], marks["promoted"]),
                   "after promotion": phase(answers, marks["promoted"], marks["rollback"]),
                   "rollback": phase(answers, marks["rollback"], marks["rolled_back"]),
                   "after rollback": phase(answers, marks["rolled_back"], marks["end"])},
        "failed": sum(a[1] != 200 for a in answers), "requests": len(answers),
        "switches": switches,
        "seconds": {"promote_to_first_answer": round(marks["first_new"] - marks["promote"], 2),
                    "promote_rollout": out["rollout"], "rollback_to_first_answer":
                    round(marks["first_old"] - marks["rollback"], 2), "rollback_rollout": back["rollout"]},
        "audit": {"entries": [(e["seq"], e["action"], e["from_version"], e["to_version"]) for e in audit.entries()],
                  "problems": audit.verify()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model version folder (students/onnx)")
    parser.add_argument("--index", required=True, help="artifact root of an index built with that model")
    parser.add_argument("--tracking-uri", help="an MLflow tracking server (default: one started here)")
    parser.add_argument("--name", default="drill-students", help="registered model name (default: %(default)s)")
    parser.add_argument("--rate", type=float, default=20.0, help="queries per second (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: %(default)s)")
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of each steady phase (default: %(default)s)")
    parser.add_argument("--poll", type=float, default=2.0, help="the controller's alias_poll_s (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for a switch (default: %(default)s)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="alias_drill_") as tmp:
        server = None
        tracking_uri = args.tracking_uri
        if tracking_uri is None:
            server, tracking_uri = start_mlflow(Path(tmp))
        try:
            report = drill(args, Path(tmp), tracking_uri)
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""TerraHash subcommands as Ray jobs: ``terrahash submit -- SUBCOMMAND ...`` and ``terrahash jobs ...``.

A job is ``terrahash <subcommand> <args>`` run by Ray's job submission API (``JobSubmissionClient``)
on the cluster at ``--address`` (a dashboard URL), else ``$RAY_ADDRESS`` when it is one, else the
cluster ``terrahash cluster up`` started (cluster/local_cluster.py). Each submission gets:

- a readable id, ``terrahash-<command>-<UTC time>-<4 hex>``, and ``-attempt<k>`` for its retries;
- metadata: the command, a hash of it and of the config files it names, the git commit, who
  submitted it from where, the attempt, and the job it waits for;
- a runtime_env that ships the project (``working_dir``, without virtual environments, runs and
  caches) and the job's environment (MLflow, S3 and data settings of the submitting shell, and
  ``--env``); ``TERRAHASH_RUN_NAME`` is the same for every attempt, so Ray Train resumes an attempt
  from the last checkpoint the previous one reported in its storage;
- entrypoint resources: ``--entrypoint-cpus`` and ``--entrypoint-resource`` (by default one unit-
  hundredth of ``terrahash-worker``, which worker nodes have and the head has not, so the driver does
  not land on the head by accident; ``--on-head`` drops it);
- the worker type its Ray Train workers run on (``--worker-type NAME``, default: any worker node):
  ``$TERRAHASH_WORKERS`` names the type's node resource (``terrahash-worker-<type>``) with its CPUs and
  GPUs, read from the cluster description (``cluster/cluster.yaml``), or for the local cluster from
  its state; training.distributed.apply_worker_type sets ``use_gpu`` and the CPUs per worker from it.

``--module MOD`` runs ``python -m MOD ARGS`` instead of a TerraHash subcommand (a benchmark, say).

``--after ID`` queues a job: its entrypoint first waits, on the cluster, until job ID has succeeded
(``terrahash jobs wait``, which follows a failed job into the attempts its ``--retries`` leave), and
gives up if ID fails for good or is stopped, so ``train -> distill -> index
build`` is one pipeline the client need not watch. ``--follow`` (the default) streams the logs and
exits with the job's outcome (0 succeeded, 1 failed, 3 stopped); Ctrl-C asks whether to stop the job.
``--retries N`` resubmits a job that failed (never one that was stopped) up to N times, following each.
"""
from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from cluster.local_cluster import LOCAL_WORKER_TYPE, WORKER_RESOURCE  # noqa: E402

EXCLUDES = [".venv", "venv", "runs", "mlruns", "mlruns.db", "mlartifacts", "build", "device_carry", ".git",
            "**/__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", ".cache", "*.onnx", "*.pt"]  # what .gitignore keeps out
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "TERRAHASH_DATA", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}


class JobError(ValueError):
    """A job that cannot be submitted or found as asked."""


# --- the cluster ------------------------------------------------------------------------------------


def resolve_address(address: str | None = None) -> str:
    """The job submission URL: ``address``, ``$RAY_ADDRESS`` when it is an http(s) URL, else the local cluster's."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env
    from cluster.local_cluster import ClusterError, ClusterState

    try:
        return ClusterState.load().dashboard_url
    except ClusterError:
        raise JobError("no cluster to submit to: give --address http://HEAD:8265, set RAY_ADDRESS to it, or start one "
                       "with `terrahash cluster up`") from None


def _token() -> str | None:
    """The cluster token as Ray 2.60 looks for it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def client(address: str | None = None):
    import logging

    from ray.job_submission import JobSubmissionClient

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no INFO lines of packaging and websockets here
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)  # ".git is now ignored"

    token = _token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(resolve_address(address), headers=headers)
    except (ConnectionError, RuntimeError) as err:
        raise JobError(f"cannot reach the job server at {resolve_address(address)}: {err}") from None


# --- one submission -----------------------------------------------------------------------------------


def worker_type_env(name: str | None, address: str | None = None, cluster_config: str | Path | None = None) -> dict:
    """The environment placing a job's Ray Train workers on worker type ``name`` (None: any worker node,
    never the head; cluster_config.workers_env). The type's CPUs and GPUs come from the local cluster's
    state when the job goes there, else from the cluster description (default cluster/cluster.yaml)."""
    from cluster.cluster_config import load_cluster_config, workers_env

    if name is None:
        return workers_env(None)
    if address is None and not os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        from cluster.local_cluster import ClusterState  # the local cluster: one type, its nodes' CPUs

        if name == LOCAL_WORKER_TYPE:
            return workers_env(name, ClusterState.load().cpus_per_node, 0)
        types = [LOCAL_WORKER_TYPE]
    else:
        config = load_cluster_config(cluster_config or REPO / "cluster" / "cluster.yaml")
        if name in config.workers:
            return config.workers_env(name)
        types = sorted(config.workers)
    raise JobError(f"no worker type {name!r} in the cluster; its types: {', '.join(types)}")


def submission_id(argv: list[str], attempt: int = 1, base: str | None = None) -> str:
    if base is None:
        words = [w for w in argv[:2] if not w.startswith("-")][: 2 if argv[:1] == ["index"] else 1]
        name = re.sub(r"[^a-z0-9]+", "-", "-".join(words).lower()).strip("-") or "job"
        base = f"terrahash-{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    return base if attempt == 1 else f"{base}-attempt{attempt}"


def _config_hash(argv: list[str]) -> str:
    """sha256 of the command and of every file it names (its configs), first 16 hex digits."""
    digest = hashlib.sha256(shlex.join(argv).encode())
    for word in argv:
        path = Path(word)
        if path.suffix in (".yaml", ".yml", ".json", ".csv") and path.is_file() and path.stat().st_size < 2**24:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def metadata(argv: list[str], attempt: int, base: str, after: str | None, retries: int = 0) -> dict[str, str]:
    from training.tracking import git_commit

    return {"terrahash.command": shlex.join(argv)[:1000], "terrahash.config_hash": _config_hash(argv),
            "terrahash.git_commit": git_commit() or "unknown",
            "terrahash.submitted_by": f"{getpass.getuser()}@{socket.gethostname()}",
            "terrahash.attempt": str(attempt), "terrahash.retries": str(retries), "terrahash.job": base,
            "terrahash.after": after or ""}


def runtime_env(base: str, env: dict[str, str] | None = None, working_dir: Path = REPO) -> dict:
    """The project as working_dir, and the job's environment (the submitting shell's settings, ``env``)."""
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env_vars.update(env or {})
    env_vars["TERRAHASH_RUN_NAME"] = base  # every attempt resumes the same Ray Train run
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env_vars}


def command_of(argv: list[str], module: str | None = None) -> list[str]:
    """What the job runs: ``terrahash <argv>``, or ``python -m <module> <argv>``."""
    return ["python", "-m", module, *argv] if module else ["terrahash", *argv]


def entrypoint(argv: list[str], address: str, after: str | None = None, module: str | None = None) -> str:
    """The job's command (``command_of``), first waiting on the cluster for job ``after`` to succeed when given."""
    command = shlex.join(command_of(argv, module))
    if after is None:
        return command
    return f"{shlex.join(['terrahash', 'jobs', 'wait', after, '--address', address])} && {command}"


def submit_once(argv: list[str], *, address: str | None = None, attempt: int = 1, base: str | None = None,
                after: str | None = None, env: dict | None = None, entrypoint_cpus: float = 0.0,
                entrypoint_resources: dict | None = None, module: str | None = None, retries: int = 0) -> str:
    """Submit one attempt (of ``retries`` + 1); returns its submission id."""
    url = resolve_address(address)
    named = [module.rpartition(".")[2]] if module else argv  # evaluation.bench_gpu_train: bench-gpu-train
    base = base or submission_id(named)
    job_id = submission_id(named, attempt, base)
    recorded = command_of(argv, module) if module else argv  # "python -m ...", or the subcommand alone
    client(url).submit_job(entrypoint=entrypoint(argv, url, after, module), submission_id=job_id,
                           runtime_env=runtime_env(base, env),
                           metadata=metadata(recorded, attempt, base, after, retries),
                           entrypoint_num_cpus=entrypoint_cpus,
                           entrypoint_resources=entrypoint_resources or None)
    return job_id


def status(job_id: str, address: str | None = None) -> str:
    return str(client(address).get_job_status(job_id).value)


RETRY_GRACE_S = 120.0  # how long a waiter gives a failed job's submitter to resubmit it


def next_attempt(job_id: str, address: str | None = None) -> str | None:
    """The id the failed job's next attempt gets, when its ``--retries`` leave one (else None)."""
    meta = describe(job_id, address)["metadata"]
    attempt, retries = int(meta.get("terrahash.attempt") or 1), int(meta.get("terrahash.retries") or 0)
    if attempt > retries or not meta.get("terrahash.job"):
        return None
    return submission_id([], attempt + 1, meta["terrahash.job"])


def wait(job_id: str, address: str | None = None, poll_s: float = 2.0, timeout: float | None = None,
         retries: bool = False, say=None) -> str:
    """Block until the job ends; its final status (SUCCEEDED, FAILED or STOPPED). With ``retries``, a job
    that failed with attempts left is followed into its next attempt (``<id>-attempt<k>``, submitted by
    the client that follows it), so a queue behind a job waits for its retries too."""
    jobs = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        found = str(jobs.get_job_status(job_id).value)
        if found == "FAILED" and retries and (following := next_attempt(job_id, address)):
            if say:
                say(f"job {job_id}: FAILED; waiting for its next attempt, {following}")
            if not _appears(jobs, following, RETRY_GRACE_S):
                return found
            job_id = following
            continue
        if found in EXIT_CODES:
            return found
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is still {found} after {timeout:.0f} s")
        time.sleep(poll_s)


def _appears(jobs, job_id: str, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            jobs.get_job_status(job_id)
            return True
        except RuntimeError:  # the job server answers 404: not submitted (yet)
            time.sleep(1.0)
    return False


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Stream the job's logs until it ends; its final status."""
    out = out or sys.stdout
    jobs = client(address)

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(job_id, address, poll_s=0.5)


def submit(argv: list[str], *, address: str | None = None, retries: int = 0, after: str | None = None,
           do_follow: bool = True, env: dict | None = None, entrypoint_cpus: float = 0.0,
           entrypoint_resources: dict | None = None, module: str | None = None,
           say=print) -> tuple[str, str | None]:
    """Submit ``terrahash <argv>`` (``python -m <module> <argv>`` with ``module``); with ``do_follow``,
    follow it (and its retries) to the end. Returns (the last attempt's id, its final status, or None
    when not followed)."""
    if not argv and not module:
        raise JobError("nothing to submit: give a TerraHash subcommand after --, like `terrahash submit -- train ...`")
    if retries and not do_follow:
        raise JobError("--retries resubmits a failed job as it follows it: drop --no-follow")
    base = None
    for attempt in range(1, retries + 2):
        job_id = submit_once(argv, address=address, attempt=attempt, base=base, after=after, env=env,
                             entrypoint_cpus=entrypoint_cpus, entrypoint_resources=entrypoint_resources,
                             module=module, retries=retries)
        base = base or job_id
        say(f"submitted {job_id}" + (f" (attempt {attempt} of {retries + 1})" if retries else "")
            + (f"; it runs once {after} has succeeded" if after else ""))
        if not do_follow:
            return job_id, None
        try:
            outcome = follow(job_id, address)
        except KeyboardInterrupt:
            _ask_to_stop(job_id, address, say)
            raise
        say(f"job {job_id}: {outcome}")
        if outcome != "FAILED" or attempt == retries + 1:
            return job_id, outcome
        say(f"job {job_id} failed; resubmitting (attempt {attempt + 1} of {retries + 1})")
    raise AssertionError("unreachable")


def _ask_to_stop(job_id: str, address: str | None, say) -> None:
    if not sys.stdin.isatty():
        say(f"\nleft job {job_id} running; `terrahash jobs stop {job_id}` stops it")
        return
    answer = input(f"\nstop job {job_id} too? [y/N] ").strip().lower()
    if answer in ("y", "yes"):
        client(address).stop_job(job_id)
        say(f"asked {job_id} to stop")
    else:
        say(f"left job {job_id} running; `terrahash jobs logs {job_id} --follow` to watch it")


def list_jobs(address: str | None = None) -> list[dict]:
    """Every job of the cluster, newest first: id, status, start and end time, entrypoint, metadata."""
    rows = []
    for job in client(address).list_jobs():
        rows.append({"id": job.submission_id or job.job_id, "status": str(job.status.value),
                     "start_time": job.start_time, "end_time": job.end_time, "entrypoint": job.entrypoint,
                     "message": job.message, "metadata": dict(job.metadata or {})})
    return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)


def describe(job_id: str, address: str | None = None) -> dict:
    job = client(address).get_job_info(job_id)
    return {"id": job.submission_id, "status": str(job.status.value), "message": job.message,
            "entrypoint": job.entrypoint, "start_time": job.start_time, "end_time": job.end_time,
            "metadata": dict(job.metadata or {})}


def logs(job_id: str, address: str | None = None) -> str:
    return client(address).get_job_logs(job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    return bool(client(address).stop_job(job_id))


def dumps(rows) -> str:
    return json.dumps(rows, indent=2, default=str)

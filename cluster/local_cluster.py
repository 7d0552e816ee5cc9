"""A real multi-node Ray cluster on one machine: ``terrahash cluster up|status|down``.

``up`` runs ``ray start --head`` and one ``ray start --address`` per worker, each node as if it were a
machine of its own: its own loopback address (127.0.0.<i+1>), temp dir (``/tmp/th-<gcs port>``, with
``w<i>`` appended for worker i: sessions and unpacked runtime_envs are per node, so no node replaces a
job's working_dir under another node's driver) and CPUs (``--cpus-per-node``), a small object store,
a custom resource ``terrahash-node-<i>`` (to place work on a given node) and ports chosen so that
raylets on one host do not clash. The nodes share one thing: the session's logs folder, where Ray's
job service looks for a driver's log. Worker nodes also have ``terrahash-worker``, which submitted
jobs' drivers ask for (cluster/jobs.py), and ``terrahash-worker-cpu``, their worker type's (as nodes
of type T on a rendered cluster have ``terrahash-worker-T``). Token authentication is on, as Ray 2.60
expects it: every process runs with ``RAY_AUTH_MODE=token`` and reads the token from
``~/.ray/auth_token`` (made with ``ray get-auth-token --generate`` when missing); a client on this
machine needs only ``RAY_AUTH_MODE=token``, which ``client_env`` gives.

The cluster's address, dashboard URL, ports and temp dir are kept in a state file
(``$TERRAHASH_HOME/cluster.json``, default ``~/.terrahash``), which ``status``, ``down``, ``submit``
and ``jobs`` read as their default cluster. ``down`` stops only this cluster's processes (those whose
command line names its GCS address or temp dir), never another Ray on the machine (``ray stop``
would stop them all).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OBJECT_STORE_BYTES = 256 * 2**20  # per node: small, so several nodes fit in one machine's memory
NODE_RESOURCE = "terrahash-node-{}"  # custom resource of node i (0 is the head)
WORKER_RESOURCE = "terrahash-worker"  # every worker node has 1 (cluster/jobs.py puts drivers there)
WORKER_TYPE_RESOURCE = "terrahash-worker-{}"  # every worker node of a type has 1 (where Ray Train workers go)
LOCAL_WORKER_TYPE = "cpu"  # the type of the local cluster's worker nodes
START_TIMEOUT_S = 120.0


class ClusterError(ValueError):
    """A local cluster that cannot be started, found or stopped as asked."""


def home() -> Path:
    return Path(os.environ.get("TERRAHASH_HOME") or Path.home() / ".terrahash")


def state_path() -> Path:
    return home() / "cluster.json"


@dataclass
class ClusterState:
    address: str  # the GCS address, host:port (ray.init / ray start --address)
    dashboard_url: str  # the job submission endpoint
    temp_dir: str
    workers: int
    cpus_per_node: int
    started: float
    ports: dict = field(default_factory=dict)

    def save(self) -> None:
        state_path().parent.mkdir(parents=True, exist_ok=True)
        state_path().write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> "ClusterState":
        path = state_path()
        if not path.is_file():
            raise ClusterError(f"no local cluster is recorded in {path}; start one with `terrahash cluster up`")
        return cls(**json.loads(path.read_text()))


def client_env(base: dict | None = None) -> dict[str, str]:
    """The environment a Ray process or client of the cluster needs: token authentication on, and this
    Python's scripts first on PATH (so a job's ``terrahash`` and ``python`` are this installation's)."""
    env = dict(os.environ if base is None else base)
    scripts = str(Path(sys.executable).parent)
    return {**env, "RAY_AUTH_MODE": "token", "PATH": os.pathsep.join([scripts, env.get("PATH", "")])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray() -> str:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        raise ClusterError("the `ray` command is not installed beside this Python (pip install 'ray[default]')")
    return ray


def ensure_token() -> None:
    """Make sure a token exists for token authentication (``ray get-auth-token --generate``)."""
    subprocess.run([_ray(), "get-auth-token", "--generate"], check=True, capture_output=True,
                   env=client_env())


def _start(args: list[str], what: str) -> None:
    done = subprocess.run([_ray(), "start", *args, "--disable-usage-stats"], capture_output=True, text=True,
                          env=client_env(), timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise ClusterError(f"`ray start` of the {what} failed:\n{(done.stderr or done.stdout)[-2000:]}")


def up(workers: int, cpus_per_node: int = 1, head_cpus: int | None = None) -> ClusterState:
    """Start a head and ``workers`` worker nodes on this machine; refuses when one is already up."""
    if workers < 0 or cpus_per_node < 0 or (head_cpus or 0) < 0:
        raise ClusterError(f"--workers and CPUs must be >= 0, got {workers} workers, {cpus_per_node} CPUs per node")
    if state_path().is_file():
        state = ClusterState.load()
        if alive(state):
            raise ClusterError(f"a local cluster is already up at {state.address}; `terrahash cluster down` first")
        state_path().unlink()
    ensure_token()
    gcs, dashboard, client = _free_port(), _free_port(), _free_port()
    temp_dir = f"/tmp/th-{gcs}"  # short: Ray's socket paths live under it
    state = ClusterState(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir, workers, cpus_per_node,
                         time.time(), {"gcs": gcs, "dashboard": dashboard, "client": client})
    state.save()
    try:
        _start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dashboard),
                "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--ray-client-server-port", str(client),
                "--num-cpus", str(cpus_per_node if head_cpus is None else head_cpus),
                "--resources", json.dumps({NODE_RESOURCE.format(0): 1}), *_common(state, 0)], "head")
        for i in range(1, workers + 1):
            _start_worker(state, i)
        wait_for_nodes(state, workers + 1)
    except BaseException:
        down(state)
        raise
    return state


def node_ip(i: int) -> str:
    """Node i's address: a loopback address of its own (127.0.0.<i+1>), so that nothing that finds a node by
    its IP (a job's log location, a driver's raylet) confuses two nodes of this machine."""
    if not 0 <= i < 254:
        raise ClusterError(f"a local cluster has at most 253 worker nodes, not {i}")
    return f"127.0.0.{i + 1}"


def node_temp_dir(state: ClusterState, i: int) -> str:
    """Node i's own temp dir (sessions, logs, unpacked runtime_envs), as if it were another machine: nodes
    that shared one would replace each other's copies of a job's working_dir under running drivers."""
    return state.temp_dir if i == 0 else f"{state.temp_dir}w{i}"


def _common(state: ClusterState, i: int) -> list[str]:
    # The agent's port is chosen here, not by the OS (0): a job's driver tells the dashboard where its
    # logs are by its node's configured agent port.
    return ["--object-store-memory", str(OBJECT_STORE_BYTES), "--dashboard-agent-listen-port", str(_free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0", "--temp-dir", node_temp_dir(state, i)]


def _share_logs(state: ClusterState, i: int) -> None:
    """Point worker i's session logs folder at the head's. Ray's job service reads a driver's log at the
    head's session path on the driver's node (on a real cluster, the same path on every machine); with
    a temp dir per node, the logs folder is the one thing the nodes of this machine must share."""
    head_session = Path(state.temp_dir, "session_latest").resolve()
    if not head_session.is_dir():
        raise ClusterError(f"the head's session folder {head_session} is missing")
    session = Path(node_temp_dir(state, i), head_session.name)
    session.mkdir(parents=True, exist_ok=True)
    logs = session / "logs"
    if not logs.exists():
        logs.symlink_to(head_session / "logs", target_is_directory=True)


def _start_worker(state: ClusterState, i: int) -> None:
    _share_logs(state, i)
    resources = {NODE_RESOURCE.format(i): 1, WORKER_RESOURCE: 1, WORKER_TYPE_RESOURCE.format(LOCAL_WORKER_TYPE): 1}
    _start(["--address", state.address, "--node-ip-address", node_ip(i), "--num-cpus", str(state.cpus_per_node),
            "--resources", json.dumps(resources), "--include-log-monitor", "false", *_common(state, i)], f"worker {i}")


def add_worker(state: ClusterState | None = None) -> int:
    """Start one more worker node (as an autoscaler would); returns its index."""
    state = state or ClusterState.load()
    index = state.workers + 1
    _start_worker(state, index)
    state.workers = index
    state.save()
    mine = NODE_RESOURCE.format(index)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any(n["alive"] and mine in n["resources"] for n in nodes(state)):
        if time.monotonic() > deadline:
            raise ClusterError(f"worker {index} did not join {state.address} within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.5)
    return index


def kill_node(node_id: str, state: ClusterState | None = None) -> int:
    """SIGKILL one node of the cluster, as a machine failure would: its raylet, its agents and every
    process they started. Returns how many processes were killed."""
    import psutil

    state = state or ClusterState.load()
    targets = [p for p in _processes(state) if node_id in " ".join(p.info["cmdline"] or [])]
    if not targets:
        raise ClusterError(f"no process of node {node_id} in the cluster at {state.address}")
    victims = {p.pid: p for p in targets}
    for process in targets:
        try:
            victims.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for process in victims.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    return len(victims)


def nodes(state: ClusterState) -> list[dict]:
    """The cluster's nodes as the dashboard reports them: node id, alive, resources (a subprocess, so this
    process joins no cluster)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False, configure_logging=False, logging_level='ERROR');"
            "print(json.dumps([{'node_id': n['NodeID'], 'alive': n['Alive'], 'resources': n['Resources']} "
            "for n in ray.nodes()]))") % state.address
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=client_env(), timeout=60)
    if done.returncode != 0:
        raise ClusterError(f"cannot reach the cluster at {state.address}: {done.stderr[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_for_nodes(state: ClusterState, count: int, timeout: float = START_TIMEOUT_S) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        found = [n for n in nodes(state) if n["alive"]]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise ClusterError(f"only {len(found)} of {count} nodes joined {state.address} within {timeout:.0f} s")
        time.sleep(0.5)


def _processes(state: ClusterState) -> list:
    """This cluster's processes: their command line names its GCS port or a temp dir of its nodes (all
    start with the head's)."""
    import psutil

    marks = (state.temp_dir, f":{state.ports['gcs']}", f"--gcs_server_port={state.ports['gcs']}")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid != os.getpid() and any(mark in cmdline for mark in marks) and "ray" in cmdline:
            found.append(process)
    return found


def alive(state: ClusterState) -> bool:
    return bool(_processes(state))


def down(state: ClusterState | None = None, timeout: float = 5.0) -> int:
    """Stop this cluster's processes (TERM, then KILL after ``timeout``); returns how many were stopped."""
    import psutil

    state = state or ClusterState.load()
    processes = _processes(state)
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(processes, timeout=timeout)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    if state_path().is_file() and ClusterState.load().address == state.address:
        state_path().unlink()
    for i in range(state.workers + 1):
        shutil.rmtree(node_temp_dir(state, i), ignore_errors=True)
    return len(processes)


def status(state: ClusterState | None = None) -> dict:
    """{"address", "dashboard_url", "nodes": [{"node_id", "alive", "cpus", "node"}], ...} of the cluster."""
    state = state or ClusterState.load()
    described = []
    for node in nodes(state):
        resources = node["resources"]
        index = next((k.rsplit("-", 1)[1] for k in resources if k.startswith(NODE_RESOURCE.format(""))), "?")
        described.append({"node": f"{'head' if index == '0' else 'worker ' + index}", "node_id": node["node_id"],
                          "alive": node["alive"], "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)})
    return {**asdict(state), "nodes": sorted(described, key=lambda n: n["node"])}

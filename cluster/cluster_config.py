"""The cluster TerraHash runs on, described once (``cluster/cluster.yaml``) and rendered per target.

``ClusterConfig`` (pydantic: types and ranges checked, unknown keys an error naming the key) holds what
every target needs: the container image and Ray version, the head and the worker types (CPUs, memory,
GPUs, autoscaling bounds), where outputs go (``artifact_root``: an ``s3://`` prefix or a shared folder;
``tracking_uri``: MLflow), the environment and runtime_env every process gets, the jobs (TerraHash
subcommands) and the serve settings file. ``cluster/render.py`` turns it into KubeRay manifests and a
Ray cluster launcher YAML; ``load_cluster_config`` reads the YAML.
"""
from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).with_name("cluster.yaml")
_FORBID = ConfigDict(extra="forbid")
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,40}[a-z0-9])?")  # a Kubernetes name (RFC 1123 label), short


def _kubernetes_name(value: str, what: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a short Kubernetes name (lowercase letters, digits, '-')")
    return value


class NodeType(BaseModel):
    """One kind of node: its resources and, for workers, how many the autoscaler may run."""

    model_config = _FORBID

    cpus: int = Field(ge=1, le=1024)
    memory_gb: float = Field(gt=0, le=16384)
    gpus: int = Field(0, ge=0, le=16)
    min: int = Field(0, ge=0, le=10_000)  # workers: autoscaling bounds (the head is always one)
    max: int = Field(1, ge=0, le=10_000)
    replicas: int | None = Field(None, ge=0)  # workers started with the cluster (default: min)
    instance_type: str | None = None  # the VM type for the launcher (provider-specific)
    resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources of the node

    @model_validator(mode="after")
    def _bounds(self):
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        if self.replicas is not None and not self.min <= self.replicas <= self.max:
            raise ValueError(f"replicas {self.replicas} outside [min {self.min}, max {self.max}]")
        return self

    @property
    def start(self) -> int:
        return self.min if self.replicas is None else self.replicas


class SharedVolume(BaseModel):
    """A volume every pod mounts (a ReadWriteMany PersistentVolumeClaim), for outputs kept as files."""

    model_config = _FORBID

    claim: str  # the PersistentVolumeClaim's name
    mount: str = "/mnt/terrahash"


class Launcher(BaseModel):
    """What only the Ray cluster launcher needs: the cloud provider block, SSH, how to install TerraHash."""

    model_config = _FORBID

    provider: dict = Field(default_factory=lambda: {"type": "aws", "region": "us-west-2",
                                                    "cache_stopped_nodes": False})
    ssh_user: str = "ubuntu"
    idle_timeout_minutes: float = Field(5, ge=0)
    setup_commands: list[str] = Field(default_factory=lambda: [
        "python -m pip install -q 'torch==2.14.1' 'torchvision==0.29.1'",
        "python -m pip install -q 'terrahash[all] @ git+https://github.com/terrahash/terrahash'"])


class ClusterConfig(BaseModel):
    """Everything a cluster target is rendered from (see the module docstring)."""

    model_config = _FORBID

    name: str = "terrahash"
    namespace: str = "default"
    image: str = "ghcr.io/terrahash/terrahash:latest"  # an image with TerraHash (and torch) installed
    ray_version: str = "2.60.0"
    artifact_root: str  # s3://bucket/prefix, or a folder every node sees (shared_volume)
    tracking_uri: str  # MLflow
    env: dict[str, str] = Field(default_factory=dict)  # every process's environment (no secrets: use secret_env)
    secret_env: dict[str, str] = Field(default_factory=dict)  # NAME: "secret/key", read from Kubernetes Secrets
    runtime_env: dict = Field(default_factory=dict)  # Ray runtime_env of every job (env_vars merged with env)
    head: NodeType
    workers: dict[str, NodeType]
    shared_volume: SharedVolume | None = None
    launcher: Launcher = Field(default_factory=Launcher)
    serve_settings: str = "serving/serve.yaml"  # the Serve settings the RayService is rendered from
    jobs: dict[str, list[str]]  # name: the TerraHash subcommand and its arguments; "{artifact_root}" filled in
    job_workers: dict[str, str] = Field(default_factory=dict)  # job: the worker type its Ray Train workers run on
    job_backoff_limit: int = Field(2, ge=0, le=20)  # RayJob: retries, each on a fresh cluster
    job_ttl_s: int = Field(3600, ge=0)  # RayJob: how long a finished job's cluster is kept

    @field_validator("name", "namespace")
    @classmethod
    def _kubernetes_name(cls, value: str) -> str:
        return _kubernetes_name(value, "name")

    @field_validator("workers", "jobs")
    @classmethod
    def _named_entries(cls, value: dict, info) -> dict:
        if not value:
            raise ValueError(f"at least one entry is needed in {info.field_name}")
        for name, entry in value.items():
            _kubernetes_name(name, f"{info.field_name} entry")
            if info.field_name == "jobs" and not entry:
                raise ValueError(f"job {name!r} needs a TerraHash subcommand")
        return value

    @model_validator(mode="after")
    def _job_workers(self):
        for job, type_name in self.job_workers.items():
            if job not in self.jobs:
                raise ValueError(f"job_workers names job {job!r}, which is not in jobs ({', '.join(self.jobs)})")
            if type_name not in self.workers:
                raise ValueError(f"job_workers: job {job!r} runs on worker type {type_name!r}, which is not in "
                                 f"workers ({', '.join(self.workers)})")
        return self

    def workers_env(self, type_name: str | None) -> dict[str, str]:
        """The environment that puts a job's Ray Train workers on worker type ``type_name`` (None: any worker)."""
        if type_name is None:
            return workers_env(None)
        node = self.workers[type_name]
        return workers_env(type_name, node.cpus, node.gpus)

    def job_argv(self, name: str) -> list[str]:
        """The job's arguments with ``{artifact_root}`` filled in."""
        return [word.replace("{artifact_root}", self.artifact_root.rstrip("/")) for word in self.jobs[name]]

    def job_env(self) -> dict[str, str]:
        """The environment every job runs in: ``env`` plus the tracking URI (what ``runtime_env`` adds on top)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **self.env}


def workers_env(type_name: str | None, cpus: int = 0, gpus: int = 0) -> dict[str, str]:
    """``{"TERRAHASH_WORKERS": JSON}``: the node resource of worker type ``type_name`` (None: any worker node)
    and its CPUs and GPUs, which training.distributed.apply_worker_type turns into Ray Train's resources."""
    import json

    from cluster.local_cluster import WORKER_RESOURCE, WORKER_TYPE_RESOURCE
    from training.config import WORKERS_ENV

    if type_name is None:
        return {WORKERS_ENV: json.dumps({"resource": WORKER_RESOURCE})}
    return {WORKERS_ENV: json.dumps({"type": type_name, "resource": WORKER_TYPE_RESOURCE.format(type_name),
                                             "cpus": cpus, "gpus": gpus})}


def load_cluster_config(path: str | Path = DEFAULT_CONFIG) -> ClusterConfig:
    """A ClusterConfig from YAML; ValueError naming the file and the first bad key."""
    import yaml

    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of cluster settings")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"{path}: {where}: {first['msg']}") from None

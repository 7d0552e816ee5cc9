"""Cluster manifests from one ClusterConfig (cluster/cluster_config.py): KubeRay and the Ray cluster launcher.

``render_kuberay(config)`` -> {file name: manifest}, one resource per file:

- ``raycluster.yaml``: a long-lived RayCluster (head without tasks, one worker group per worker type,
  in-tree autoscaling between each type's bounds, Ray token authentication);
- ``rayjob-<job>.yaml`` per job: a RayJob that runs ``terrahash <job's subcommand>`` on a cluster of its
  own (``shutdownAfterJobFinishes``, ``backoffLimit`` retries on a fresh cluster, ``K8sJobMode``),
  with the jobs' runtime_env and one CPU reserved for the entrypoint;
- ``rayservice.yaml``: a RayService whose ``serveConfigV2`` is serving.runtime.serve_config.serve_config of the
  config's serve settings, the same Serve config ``terrahash serve --render`` writes: the app is
  defined once.

``render_launcher(config)`` -> {"cluster-launcher.yaml": the ``ray up`` config} with the same node
types, the setup commands that install TerraHash and the environment. ``write_manifests`` writes
either set as YAML files. cluster/manifests.py validates them against their schemas.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from cluster.cluster_config import ClusterConfig, NodeType
from cluster.local_cluster import WORKER_RESOURCE, WORKER_TYPE_RESOURCE

API_VERSION = "ray.io/v1"
GPU_RESOURCE = "nvidia.com/gpu"
HEAD_PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}


# --- KubeRay ----------------------------------------------------------------------------------------


def _quantities(node: NodeType) -> dict:
    """A container's requests and limits: CPUs, memory (Gi) and GPUs, requested as limited."""
    amounts = {"cpu": str(node.cpus), "memory": f"{node.memory_gb:g}Gi"}
    if node.gpus:
        amounts[GPU_RESOURCE] = str(node.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _env(config: ClusterConfig) -> list[dict]:
    env = [{"name": name, "value": value} for name, value in sorted(config.job_env().items())]
    for name, ref in sorted(config.secret_env.items()):
        secret, _, key = ref.partition("/")
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key or name}}})
    return env


def _pod(config: ClusterConfig, node: NodeType, container: str, ports: dict | None = None) -> dict:
    """A pod template running the image with the node's resources, the environment and the shared volume."""
    spec = {"name": container, "image": config.image, "imagePullPolicy": "IfNotPresent",
            "resources": _quantities(node), "env": _env(config)}
    if ports:
        spec["ports"] = [{"name": name, "containerPort": port} for name, port in ports.items()]
    pod: dict = {"containers": [spec]}
    if config.shared_volume is not None:
        spec["volumeMounts"] = [{"name": "shared", "mountPath": config.shared_volume.mount}]
        pod["volumes"] = [{"name": "shared", "persistentVolumeClaim": {"claimName": config.shared_volume.claim}}]
    if node.gpus:
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "terrahash"}}, "spec": pod}


def _custom(node: NodeType, type_name: str | None) -> dict:
    """A node's custom Ray resources: its own, and on workers ``terrahash-worker`` (submitted jobs' drivers)
    and ``terrahash-worker-<type>`` (where ``submit --worker-type`` puts Ray Train workers)."""
    if type_name is None:  # the head
        return dict(node.resources)
    return {WORKER_RESOURCE: 1, WORKER_TYPE_RESOURCE.format(type_name): 1, **node.resources}


def _start_params(node: NodeType, type_name: str | None = None) -> dict[str, str]:
    import json

    params = {"dashboard-host": "0.0.0.0", "num-cpus": "0"} if type_name is None else {}  # the head runs no tasks
    if _custom(node, type_name):
        params["resources"] = json.dumps(_custom(node, type_name), sort_keys=True)
    return params


def ray_cluster_spec(config: ClusterConfig) -> dict:
    """The ``spec`` of a RayCluster (also a RayJob's ``rayClusterSpec`` and a RayService's ``rayClusterConfig``)."""
    workers = [{"groupName": name, "replicas": node.start, "minReplicas": node.min, "maxReplicas": node.max,
                "rayStartParams": _start_params(node, name), "template": _pod(config, node, "ray-worker")}
               for name, node in config.workers.items()]
    return {"rayVersion": config.ray_version, "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
            "authOptions": {"mode": "token"},
            "headGroupSpec": {"rayStartParams": _start_params(config.head),
                              "template": _pod(config, config.head, "ray-head", HEAD_PORTS)},
            "workerGroupSpecs": workers}


def _metadata(config: ClusterConfig, name: str, component: str) -> dict:
    return {"name": name, "namespace": config.namespace,
            "labels": {"app.kubernetes.io/name": "terrahash", "app.kubernetes.io/component": component}}


def entrypoint(config: ClusterConfig, job: str) -> str:
    return shlex.join(["terrahash", *config.job_argv(job)])


def job_runtime_env(config: ClusterConfig, job: str | None = None) -> dict:
    """The runtime_env of a job: the config's, its env_vars on top of the cluster's environment and of
    the placement of the job's Ray Train workers (its ``job_workers`` type, else any worker node)."""
    runtime_env = dict(config.runtime_env)
    placement = config.workers_env(config.job_workers.get(job)) if job else {}
    runtime_env["env_vars"] = {**placement, **config.job_env(), **runtime_env.get("env_vars", {})}
    return runtime_env


def rayjob(config: ClusterConfig, job: str) -> dict:
    import yaml

    return {"apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(config, f"{config.name}-{job}", job),
            "spec": {"entrypoint": entrypoint(config, job),
                     "runtimeEnvYAML": yaml.safe_dump(job_runtime_env(config, job), sort_keys=True),
                     "entrypointNumCpus": 1, "submissionMode": "K8sJobMode",
                     "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": config.job_ttl_s,
                     "backoffLimit": config.job_backoff_limit, "rayClusterSpec": ray_cluster_spec(config)}}


def serve_config_v2(config: ClusterConfig, root: Path | None = None) -> dict:
    """The Serve config of the config's serve settings, listening on every interface of the head."""
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import load_settings

    path = Path(config.serve_settings)
    if not path.is_absolute():
        path = (root or Path(__file__).resolve().parents[1]) / path
    return serve_config(load_settings(path), host="0.0.0.0", port=HEAD_PORTS["serve"])


def rayservice(config: ClusterConfig) -> dict:
    import yaml

    return {"apiVersion": API_VERSION, "kind": "RayService", "metadata": _metadata(config, config.name, "serve"),
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config_v2(config), sort_keys=False),
                     "rayClusterConfig": ray_cluster_spec(config)}}


def render_kuberay(config: ClusterConfig) -> dict[str, dict]:
    manifests = {"raycluster.yaml": {"apiVersion": API_VERSION, "kind": "RayCluster",
                                     "metadata": _metadata(config, config.name, "cluster"),
                                     "spec": ray_cluster_spec(config)}}
    for job in config.jobs:
        manifests[f"rayjob-{job}.yaml"] = rayjob(config, job)
    manifests["rayservice.yaml"] = rayservice(config)
    return manifests


# --- the Ray cluster launcher (VMs) -----------------------------------------------------------------


def _launcher_resources(node: NodeType, type_name: str | None = None) -> dict:
    resources = {"CPU": 0 if type_name is None else node.cpus, "memory": int(node.memory_gb * 2**30),
                 **_custom(node, type_name)}
    if node.gpus:
        resources["GPU"] = node.gpus
    return resources


def render_launcher(config: ClusterConfig) -> dict[str, dict]:
    """The ``ray up`` config: node types, autoscaling bounds, setup commands and the environment."""
    exports = [f"echo {shlex.quote(f'export {k}={shlex.quote(v)}')} >> ~/.bashrc"
               for k, v in sorted(config.job_env().items())]
    types = {"head": {"node_config": {"InstanceType": config.head.instance_type or "m6i.xlarge"},
                      "resources": _launcher_resources(config.head), "min_workers": 0, "max_workers": 0}}
    for name, node in config.workers.items():
        types[name] = {"node_config": {"InstanceType": node.instance_type or "m6i.2xlarge"},
                       "resources": _launcher_resources(node, name), "min_workers": node.min, "max_workers": node.max}
    launcher = config.launcher
    return {"cluster-launcher.yaml": {
        "cluster_name": config.name,
        "max_workers": sum(node.max for node in config.workers.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": launcher.idle_timeout_minutes,
        "provider": dict(launcher.provider),
        "auth": {"ssh_user": launcher.ssh_user},
        "available_node_types": types,
        "head_node_type": "head",
        "file_mounts": {},
        "setup_commands": [*launcher.setup_commands, *exports],
        "head_start_ray_commands": ["ray stop", "ray start --head --port=6379 --num-cpus=0 --dashboard-host=0.0.0.0 "
                                                "--autoscaling-config=~/ray_bootstrap_config.yaml"],
        "worker_start_ray_commands": ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"],
    }}


def write_manifests(manifests: dict[str, dict], out: str | Path, header: str = "") -> list[Path]:
    """Each manifest as a YAML file under ``out``; returns the paths."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, manifest in manifests.items():
        path = out / name
        path.write_text(header + yaml.safe_dump(manifest, sort_keys=False))
        written.append(path)
    return written

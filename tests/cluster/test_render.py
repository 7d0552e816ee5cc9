"""`terrahash cluster render`: KubeRay manifests and the launcher YAML from cluster/cluster.yaml, validated
strictly against KubeRay's own CRD schemas (../shared/kuberay), Ray's cluster config schema and Serve's."""
from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
import yaml

from cluster.cli.main import build_parser, main
from cluster.cluster_config import DEFAULT_CONFIG, ClusterConfig, load_cluster_config
from cluster.manifests import crd_folder, kuberay_problems, launcher_problems, serve_config_problems
from cluster.render import render_kuberay, render_launcher

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not (crd_folder() / "ray.io_rayclusters.yaml").is_file(),
                                reason="KubeRay's CRDs are not beside the project (../shared/kuberay)")


def test_rendered_files_validate_and_define_the_app_once(tmp_path, capsys):
    assert main(["cluster", "render", "--target", "kuberay", "--out", str(tmp_path / "k8s")]) == 0
    assert main(["cluster", "render", "--target", "launcher", "--out", str(tmp_path / "vm")]) == 0
    names = sorted(p.name for p in (tmp_path / "k8s").iterdir())
    assert names == ["raycluster.yaml", "rayjob-distill.yaml", "rayjob-index-build.yaml", "rayjob-train.yaml",
                     "rayservice.yaml"]
    for path in (tmp_path / "k8s").iterdir():
        manifest = yaml.safe_load(path.read_text())
        assert kuberay_problems(manifest) == [], path.name
    launcher = yaml.safe_load((tmp_path / "vm" / "cluster-launcher.yaml").read_text())
    assert launcher_problems(launcher) == []
    # The RayService serves exactly the Serve config `terrahash serve --render` writes from the same settings.
    from serving.runtime.serve_config import serve_config
    from serving.runtime.settings import load_settings

    service = yaml.safe_load((tmp_path / "k8s" / "rayservice.yaml").read_text())
    v2 = service["spec"]["serveConfigV2"]
    assert serve_config_problems(v2) == []
    assert yaml.safe_load(v2) == serve_config(load_settings(REPO / "serving" / "serve.yaml"), host="0.0.0.0")


def test_the_resources_follow_the_description():
    config = load_cluster_config()
    cluster = render_kuberay(config)["raycluster.yaml"]["spec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == set(config.workers) and cluster["authOptions"] == {"mode": "token"}
    gpu = groups["gpu"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and (gpu["minReplicas"], gpu["maxReplicas"]) == (0, 2)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no tasks on the head
    env = {e["name"]: e for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == config.tracking_uri
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "terrahash-s3",
                                                                         "key": "secret_access_key"}
    from serving.runtime.ingress import HAPROXY_ENV

    for group in [cluster["headGroupSpec"], *groups.values()]:  # Serve's HAProxy ingress on every node
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in HAPROXY_ENV} == HAPROXY_ENV
    vm = render_launcher(config)["cluster-launcher.yaml"]
    assert vm["available_node_types"]["gpu"]["resources"]["GPU"] == 1
    assert vm["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert vm["max_workers"] == sum(w.max for w in config.workers.values())


def test_every_job_is_a_terrahash_command_that_parses():
    config = load_cluster_config()
    for job in config.jobs:
        manifest = render_kuberay(config)[f"rayjob-{job}.yaml"]
        words = shlex.split(manifest["spec"]["entrypoint"])
        assert words[0] == "terrahash"
        build_parser().parse_args(words[1:])  # SystemExit if the job is no valid command
        assert manifest["spec"]["backoffLimit"] == config.job_backoff_limit
        env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["env_vars"]
        assert env["MLFLOW_TRACKING_URI"] == config.tracking_uri
    assert "s3://my-bucket/terrahash/ray" in render_kuberay(config)["rayjob-train.yaml"]["spec"]["entrypoint"]


def test_jobs_put_their_ray_train_workers_on_the_described_worker_type(monkeypatch):
    """The train job's workers go to the gpu type, whose GPU and CPUs decide use_gpu and CPUs per worker;
    every node of a type has that type's resource. Other jobs' workers go to any worker node."""
    from training.config import DistributedConfig
    from training.distributed import apply_worker_type

    config = load_cluster_config()
    manifests = render_kuberay(config)
    groups = {g["groupName"]: g for g in manifests["raycluster.yaml"]["spec"]["workerGroupSpecs"]}
    assert json.loads(groups["gpu"]["rayStartParams"]["resources"]) == {"terrahash-worker": 1, "terrahash-worker-gpu": 1}
    vm = render_launcher(config)["cluster-launcher.yaml"]["available_node_types"]
    assert vm["cpu"]["resources"]["terrahash-worker-cpu"] == 1 and "terrahash-worker" not in vm["head"]["resources"]
    env = {job: yaml.safe_load(manifests[f"rayjob-{job}.yaml"]["spec"]["runtimeEnvYAML"])["env_vars"]
           for job in config.jobs}
    monkeypatch.setenv("TERRAHASH_WORKERS", env["train"]["TERRAHASH_WORKERS"])
    d = DistributedConfig(num_workers=1)
    assert apply_worker_type(d) == {"terrahash-worker-gpu": 0.001}
    assert d.use_gpu and d.cpus_per_worker == config.workers["gpu"].cpus // config.workers["gpu"].gpus
    monkeypatch.setenv("TERRAHASH_WORKERS", env["distill"]["TERRAHASH_WORKERS"])
    d = DistributedConfig(num_workers=1)
    assert apply_worker_type(d) == {"terrahash-worker": 0.001} and not d.use_gpu and d.cpus_per_worker == 1
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["job_workers"] = {"train": "tpu"}
    with pytest.raises(ValueError, match="worker type 'tpu', which is not in workers"):
        ClusterConfig.model_validate(data)


def test_validation_names_a_misspelt_field():
    config = load_cluster_config()
    manifests = render_kuberay(config)
    job = copy.deepcopy(manifests["rayjob-train.yaml"])
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # for maxReplicas
    assert kuberay_problems(job) == ["spec.rayClusterSpec.workerGroupSpecs.0: Additional properties are not "
                                     "allowed ('maxReplica' was unexpected)"]
    service = copy.deepcopy(manifests["rayservice.yaml"])
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    assert any("imagePullPolcy" in p for p in kuberay_problems(service))
    service = copy.deepcopy(manifests["rayservice.yaml"])
    service["spec"]["serveConfigV2"] = yaml.safe_dump({"applications": [{"name": "a", "import_path": "x:y",
                                                                         "num_replica": 2}]})
    assert any("num_replica" in p for p in kuberay_problems(service))
    vm = copy.deepcopy(render_launcher(config)["cluster-launcher.yaml"])
    vm["available_node_types"]["cpu"]["min_worker"] = 1
    assert any("min_worker" in p for p in launcher_problems(vm))


def test_a_bad_description_is_refused_with_the_key(tmp_path):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["workers"]["cpu"]["max_worker"] = 3
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"workers\.cpu\.max_worker"):
        load_cluster_config(path)
    data["workers"]["cpu"].pop("max_worker")
    data["workers"]["cpu"]["min"] = 9
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="min 9 > max 8"):
        load_cluster_config(path)
    assert main(["cluster", "render", "--target", "kuberay", "--out", str(tmp_path / "k"), "--config", str(path)]) == 2


def _readme_lines(prefixes: tuple[str, ...]) -> list[list[str]]:
    import re

    text = (REPO / "cluster" / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            line = re.sub(r"^[A-Z_]+=\$\((.*)\)$", r"\1", line)  # ID=$(terrahash submit ... --print-id ...)
            if line.startswith(prefixes):
                lines.append(shlex.split(line)[1:])
    return lines


def test_the_readme_cluster_commands_run_or_parse(tmp_path, capsys):
    """`cluster render` as cluster/README.md writes it (only --out moved); the other cluster, submit and jobs
    commands parse as written (tests/cluster/test_local_cluster.py and test_jobs.py run them)."""
    renders = _readme_lines(("terrahash cluster render",))
    assert {argv[argv.index("--target") + 1] for argv in renders} == {"kuberay", "launcher"}
    for argv in renders:
        argv[argv.index("--out") + 1] = str(tmp_path / argv[argv.index("--out") + 1])
        assert main(argv) == 0, capsys.readouterr()
    others = _readme_lines(("terrahash cluster", "terrahash submit", "terrahash jobs"))
    assert {tuple(a[:2]) for a in others} >= {("cluster", "up"), ("cluster", "status"), ("cluster", "down"),
                                              ("jobs", "list")} and any(a[0] == "submit" for a in others)
    for argv in others:
        build_parser().parse_args(argv)

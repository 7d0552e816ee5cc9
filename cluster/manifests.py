"""Strict validation of rendered cluster manifests against the schemas their consumers apply.

- KubeRay (RayCluster, RayJob, RayService): the CRD's ``openAPIV3Schema`` (the schema the Kubernetes API
  server applies), read from a KubeRay CRD folder (``../shared/kuberay`` beside the project, or
  ``$TERRAHASH_KUBERAY_CRDS``). The API server prunes fields a structural schema does not define instead
  of refusing them, so a misspelt field would vanish silently: here every object that lists its
  properties and neither declares ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
  refuses unknown ones. ``x-kubernetes-int-or-string`` accepts an integer or a string.
- The Ray cluster launcher YAML: ``ray/autoscaler/ray-schema.json``, shipped inside the ``ray`` package.
- A RayService's ``serveConfigV2``: Ray Serve's own ``ServeDeploySchema``, and no key it would ignore.

Each ``*_problems`` function returns readable problems (``where: what``), empty when the manifest is valid.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


def crd_folder() -> Path:
    """Where the KubeRay CRDs are: ``$TERRAHASH_KUBERAY_CRDS``, else ``../shared/kuberay`` beside the project."""
    return Path(os.environ.get("TERRAHASH_KUBERAY_CRDS") or Path(__file__).resolve().parents[2] / "shared" / "kuberay")


def strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema that refuses unknown fields (see the module docstring)."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, list):
            for child in node:
                visit(child)
            return
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for child in node.values():
            visit(child)

    visit(schema)
    return schema


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str):
    import yaml
    from jsonschema import Draft7Validator

    path = crd_folder() / f"ray.io_{KINDS[kind]}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no KubeRay CRD for {kind} at {path} (set $TERRAHASH_KUBERAY_CRDS to the folder "
                                "of ray.io_*.yaml)")
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def _problems(validator, document) -> list[str]:
    def where(error):
        return ".".join(str(part) for part in error.absolute_path) or "(top)"

    return [f"{where(e)}: {e.message}" for e in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))]


def kuberay_problems(manifest: dict) -> list[str]:
    """Problems of a RayCluster, RayJob or RayService manifest (strict CRD schema; a RayService's
    serveConfigV2 also against Serve's schema)."""
    kind = manifest.get("kind")
    if kind not in KINDS:
        return [f"kind: {kind!r} is not one of {sorted(KINDS)}"]
    if manifest.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion: {manifest.get('apiVersion')!r}, expected 'ray.io/v1'"]
    problems = _problems(_crd_validator(kind), manifest)
    if kind == "RayService" and isinstance(manifest.get("spec", {}).get("serveConfigV2"), str):
        problems += [f"spec.serveConfigV2: {p}" for p in serve_config_problems(manifest["spec"]["serveConfigV2"])]
    return problems


def launcher_problems(config: dict) -> list[str]:
    """Problems of a Ray cluster launcher config, against the schema shipped inside ``ray``."""
    import json

    import ray
    from jsonschema import Draft7Validator

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    return _problems(Draft7Validator(schema), config)


def serve_config_problems(text: str) -> list[str]:
    """Problems of a Serve config (YAML text) as Ray Serve's ServeDeploySchema reads it, plus the keys it
    would ignore: Serve's schema drops unknown keys, so a misspelt ``num_replica`` would vanish."""
    import yaml
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    data = yaml.safe_load(text)
    try:
        ServeDeploySchema.model_validate(data)
    except ValidationError as err:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]

    def unknown(value, model, where):
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}: unknown key {key!r} (Serve would ignore it)" for key in value if key not in known]

    problems = unknown(data, ServeDeploySchema, "(top)")
    problems += unknown(data.get("http_options") or {}, HTTPOptionsSchema, "http_options")
    for i, app in enumerate(data.get("applications") or []):
        problems += unknown(app, ServeApplicationSchema, f"applications.{i}")
        for j, deployment in enumerate(app.get("deployments") or []):
            problems += unknown(deployment, DeploymentSchema, f"applications.{i}.deployments.{j}")
    return problems

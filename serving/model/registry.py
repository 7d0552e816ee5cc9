"""The MLflow model registry as the source of model versions: resolve ``models:/`` URIs, fetch verified copies.

A model version is a registered version of the students (``terrahash distill`` registers each pair as
a new version of ``terrahash-students``): its source is the run's ``onnx/`` artifacts, the ONNX files
with one ``*.spec.json`` each. Every machine that needs a version (index builds, every serving
replica) calls ``fetch_model``, which downloads it from the registry's artifact store (a folder,
``s3://``, or an MLflow server's proxied ``mlflow-artifacts:``) once per machine into
``<cache_dir>/<name>/<version>/``, never from a path on the machine that trained it.

Fetch rule: download into a temp folder beside the cache entry, check that every spec's
``model_sha256`` is its ONNX file's, record each file's size and sha256 in ``FETCH_RECORD``, then
rename the folder into place; all under an exclusive ``flock`` of ``<name>/.<version>.lock``, so the
replicas of one node download once and the others wait and reuse it. A cached copy is re-checked
against its record by file sizes (``verify="size"``, the default; ``"sha256"`` re-hashes) and fetched
again when it does not match.

URIs: ``models:/NAME/VERSION`` (a number) or ``models:/NAME@ALIAS``; anything else is a folder.
Tracking URI, highest first: the argument, ``$MLFLOW_TRACKING_URI``, then the project's default
(``./mlruns.db``, where ``terrahash train`` and ``terrahash distill`` track by default). No torch;
mlflow is imported inside the functions that need it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from serving.storage import sha256_file

log = logging.getLogger(__name__)

SCHEME = "models:/"
DEFAULT_CACHE = "/tmp/terrahash/models"
DEFAULT_DB = "mlruns.db"  # the default store of training runs and model versions, in the working directory
DEFAULT_ARTIFACTS = "mlartifacts"
FETCH_RECORD = ".terrahash-fetch.json"  # in a fetched folder: each file's bytes and sha256, written last
INDEX_RELEASES_TAG = "terrahash.index_releases"  # model version tag: [{"index": root URI, "release": "rNNNN"}]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")  # MLflow's own rule for aliases is stricter than names


class ModelNotFoundError(ValueError):
    """A registered model, version or alias that the registry does not hold (the message names what it holds)."""


class ModelIntegrityError(ValueError):
    """A fetched model version whose files do not match its specs."""


@dataclass(frozen=True)
class ModelRef:
    """A model version: a registered one (name, version, the alias it was asked by) or a plain folder
    (name and version None). ``source``: where its files are (artifact URI or folder)."""

    uri: str
    name: str | None
    version: str | None
    alias: str | None
    source: str
    run_id: str | None = None
    tags: dict = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return self.name is not None

    @property
    def version_uri(self) -> str | None:
        """``models:/NAME/VERSION`` (always the number, even when asked by alias); None for a folder."""
        return f"{SCHEME}{self.name}/{self.version}" if self.registered else None


def parse_model_uri(uri) -> tuple[str, str | None, str | None] | None:
    """``models:/NAME/VERSION`` -> (name, version, None); ``models:/NAME@ALIAS`` -> (name, None, alias);
    anything not starting with ``models:/`` is a folder: None. A malformed ``models:/`` string is a
    ValueError saying what is expected."""
    text = str(uri)
    if not text.startswith(SCHEME):
        return None
    rest = text[len(SCHEME):]
    expected = f"expected {SCHEME}NAME/VERSION (a version number) or {SCHEME}NAME@ALIAS, got {text!r}"
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if not _NAME.fullmatch(name) or not _ALIAS.fullmatch(alias):
            raise ValueError(f"malformed model URI: {expected}")
        return name, None, alias
    name, _, version = rest.partition("/")
    if not _NAME.fullmatch(name) or not version.isdigit() or int(version) < 1:
        raise ValueError(f"malformed model URI: {expected}")
    return name, str(int(version)), None


def resolve_tracking_uri(tracking_uri: str | None = None) -> tuple[str, str | None]:
    """The tracking URI and the artifact location for a new experiment (None: the store's own default).

    ``tracking_uri`` wins, then ``$MLFLOW_TRACKING_URI``; with neither, the SQLite database
    ``./mlruns.db`` with artifacts in ``./mlartifacts/``, in the current working directory.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    cwd = Path.cwd()
    return f"sqlite:///{cwd / DEFAULT_DB}", (cwd / DEFAULT_ARTIFACTS).as_uri()


def tracking_uri_of(tracking_uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else $MLFLOW_TRACKING_URI, else the project's default."""
    return resolve_tracking_uri(tracking_uri)[0]


def client(tracking_uri: str | None = None):
    """An MlflowClient of the tracking URI (``tracking_uri_of``); its registry is the same store."""
    from mlflow import MlflowClient

    quiet_mlflow()
    return MlflowClient(tracking_uri_of(tracking_uri))


def quiet_mlflow() -> None:
    """No progress bars nor INFO lines from MLflow on the command line (warnings still show)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    quiet_mlflow_logs()


def quiet_mlflow_logs() -> None:
    """No INFO lines from MLflow and its database migrations (warnings still show)."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(max(logging.getLogger(name).level, logging.WARNING))


def resolve_model(uri, tracking_uri: str | None = None) -> ModelRef:
    """The model version ``uri`` names. A folder: a ModelRef with name and version None, source the
    folder. A ``models:/`` URI: looked up in the registry (ModelNotFoundError naming the registered
    models, versions or aliases that exist when it is not there)."""
    parsed = parse_model_uri(uri)
    if parsed is None:
        folder = str(uri) if str(uri).startswith("s3://") else str(Path(str(uri)).expanduser())
        return ModelRef(uri=str(uri), name=None, version=None, alias=None, source=folder)
    name, version, alias = parsed
    mlflow_client = client(tracking_uri)
    model = _registered_model(mlflow_client, name)
    try:
        found = (mlflow_client.get_model_version(name, version) if version is not None
                 else mlflow_client.get_model_version_by_alias(name, alias))
    except Exception as err:  # noqa: BLE001  (MlflowException; its kind is in error_code)
        if getattr(err, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        if version is not None:
            versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
            raise ModelNotFoundError(f"registered model {name!r} has no version {version}; its versions: "
                                     f"{versions or 'none'}") from None
        aliases = dict(getattr(model, "aliases", {}) or {})
        raise ModelNotFoundError(f"registered model {name!r} has no alias {alias!r}; its aliases: "
                                 f"{', '.join(f'{a} -> {v}' for a, v in sorted(aliases.items())) or 'none'}") from None
    return ModelRef(uri=str(uri), name=name, version=str(found.version), alias=alias, source=found.source,
                    run_id=found.run_id or None, tags=dict(found.tags or {}))


def _registered_model(mlflow_client, name: str):
    try:
        return mlflow_client.get_registered_model(name)
    except Exception as err:  # noqa: BLE001
        if getattr(err, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in mlflow_client.search_registered_models(max_results=100))
        raise ModelNotFoundError(f"no registered model {name!r} in {mlflow_client.tracking_uri}; registered: "
                                 f"{names or 'none'}") from None


def _other_source(folder: Path, ref: ModelRef) -> str | None:
    """A cached copy fetched for another registration of the same name and version (another registry, or a
    version deleted and registered again) is not this one."""
    try:
        source = json.loads((folder / FETCH_RECORD).read_text()).get("source")
    except (OSError, ValueError):
        return "no fetch record"
    return None if source == ref.source else f"it was fetched from {source}, this version's files are at {ref.source}"


def fetch_model(uri, cache_dir: str | Path = DEFAULT_CACHE, tracking_uri: str | None = None,
                verify: str = "size") -> Path:
    """A local folder holding the model version's ONNX files and specs.

    ``uri``: a folder (returned as it is, after checking that it exists), an ``s3://`` folder written by
    ``ArtifactRoot.put_dir`` (fetched into ``cache_dir/s3``, checked against its manifest), ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS`` or a ModelRef. A registered version is downloaded once per machine into
    ``cache_dir/<name>/<version>/`` (see the module's fetch rule); ``verify`` ("size" or "sha256") is
    how a copy already there is re-checked before it is reused.
    """
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify must be 'size' or 'sha256', got {verify!r}")
    ref = uri if isinstance(uri, ModelRef) else resolve_model(uri, tracking_uri)
    if not ref.registered and ref.source.startswith("s3://"):  # a folder of an artifact root
        from serving.storage import fetch_folder

        return fetch_folder(ref.source, Path(cache_dir).expanduser() / "s3")
    if not ref.registered:
        folder = Path(ref.source)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {ref.source!r} does not exist (give a folder of exported "
                                    f"students or {SCHEME}NAME/VERSION)")
        return folder
    parent = Path(cache_dir).expanduser() / ref.name
    target = parent / ref.version
    parent.mkdir(parents=True, exist_ok=True)
    with file_lock(parent / f".{ref.version}.lock"):
        if target.exists():
            problem = cached_problem(target, verify) or _other_source(target, ref)
            if problem is None:
                return target
            log.warning("cached copy of %s is bad (%s): fetching it again", ref.version_uri, problem)
            shutil.rmtree(target)
        temp = parent / f".{ref.version}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
        try:
            downloaded = _download(ref, temp, tracking_uri)
            record = verify_model_files(downloaded, f"{ref.version_uri} ({ref.source})")
            (downloaded / FETCH_RECORD).write_text(json.dumps(
                {"uri": ref.version_uri, "source": ref.source, "files": record}, indent=2, sort_keys=True))
            os.rename(downloaded, target)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    log.info("fetched %s into %s", ref.version_uri, target)
    return target


def _download(ref: ModelRef, temp: Path, tracking_uri: str | None) -> Path:
    """Download the version's source into ``temp``; the folder that holds its files."""
    from mlflow.artifacts import download_artifacts

    quiet_mlflow()
    temp.mkdir(parents=True)
    local = Path(download_artifacts(artifact_uri=ref.source, dst_path=str(temp),
                                    tracking_uri=tracking_uri_of(tracking_uri)))
    if not local.is_dir():
        raise ModelIntegrityError(f"{ref.version_uri}: its source {ref.source} is a file, not a folder of "
                                  f"ONNX files and specs")
    return local


def verify_model_files(folder: Path, what: str) -> dict:
    """Check that ``folder`` holds at least one spec and that every spec's ONNX file has the spec's
    sha256; returns {file name: {"bytes", "sha256"}} of every file. ModelIntegrityError otherwise."""
    from serving.model.spec import SPEC_SUFFIX, load_spec

    specs = sorted(folder.glob(f"*{SPEC_SUFFIX}"))
    if not specs:
        raise ModelIntegrityError(f"{what}: no *{SPEC_SUFFIX} files in it (not an export of terrahash distill)")
    record = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
              for p in sorted(folder.rglob("*")) if p.is_file() and p.name != FETCH_RECORD}
    for path in specs:
        spec = load_spec(path)
        model = spec.model_path.relative_to(folder).as_posix()
        if model not in record:
            raise ModelIntegrityError(f"{what}: {path.name} names {model}, which is not there")
        if record[model]["sha256"] != spec.data["model_sha256"]:
            raise ModelIntegrityError(f"{what}: {model} has sha256 {record[model]['sha256'][:12]}..., its spec "
                                      f"{path.name} says {spec.data['model_sha256'][:12]}...; refusing to use it")
    return record


def cached_problem(folder: Path, verify: str = "size") -> str | None:
    """What is wrong with a fetched copy against its ``FETCH_RECORD`` (None: nothing): a missing or
    extra file, a size (or with ``verify="sha256"`` a checksum) that differs."""
    try:
        record = json.loads((folder / FETCH_RECORD).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"no readable {FETCH_RECORD} ({err})"
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != FETCH_RECORD}
    if present != set(record):
        return f"files differ from the fetch: missing {sorted(set(record) - present)}, extra {sorted(present - set(record))}"
    for name, expected in sorted(record.items()):
        path = folder / name
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['bytes']} were fetched"
        if verify == "sha256" and sha256_file(path) != expected["sha256"]:
            return f"{name} no longer has the sha256 it was fetched with"
    return None


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on ``path``, held for the block (other processes and threads wait)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the index releases built with a version -------------------------------------------------------


def index_releases(ref: ModelRef, tracking_uri: str | None = None) -> list[dict]:
    """The index releases built with a registered version, oldest first: [{"index": root, "release"}],
    from its ``terrahash.index_releases`` tag (read afresh from the registry)."""
    if not ref.registered:
        return []
    version = client(tracking_uri).get_model_version(ref.name, ref.version)
    return _parse_releases(version.tags.get(INDEX_RELEASES_TAG), ref)


def _parse_releases(text: str | None, ref: ModelRef) -> list[dict]:
    if not text:
        return []
    try:
        entries = json.loads(text)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and {"index", "release"} <= set(e)
                                                    for e in entries):
            raise ValueError("not a list of {index, release}")
    except ValueError as err:
        raise ValueError(f"{ref.version_uri}: tag {INDEX_RELEASES_TAG} is not readable ({err}): {text[:200]!r}") from None
    return entries


def add_index_release_tag(ref: ModelRef, index_root: str, release: str, tracking_uri: str | None = None) -> list[dict]:
    """Record on a registered version that ``release`` of the index at ``index_root`` was built with it
    (appended to its ``terrahash.index_releases`` tag, once); returns the list. A folder: nothing."""
    if not ref.registered:
        return []
    mlflow_client = client(tracking_uri)
    entries = index_releases(ref, tracking_uri)
    entry = {"index": str(index_root), "release": str(release)}
    if entry not in entries:
        entries.append(entry)
        mlflow_client.set_model_version_tag(ref.name, ref.version, INDEX_RELEASES_TAG, json.dumps(entries))
    return entries

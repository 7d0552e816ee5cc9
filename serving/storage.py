"""The artifact root: where checkpoints, models and indexes live, a local folder or ``s3://``.

Both kinds offer the same small interface, so a job never cares which one it was given.
Folders are written with a ``MANIFEST.json`` of sha256 checksums and verified when read back:
a corrupted or half-uploaded file fails loudly instead of loading.

Durability and exclusivity, the two promises index versions and releases are built on:

* a local write goes to a temp file of its own (``.<name>.<pid>.<random>.partial``, never shared
  between writers), is fsynced, renamed into place, and the folder is fsynced; so once
  ``write_bytes`` returns the file survives a power cut, and a reader never sees half of it;
* ``create_bytes`` publishes a key only if it does not exist yet, else FileExistsError. Locally the
  fsynced temp file is hard-linked to the final name (link(2) fails with EEXIST, atomically, and
  the name never points at a partial file); on S3 it is a conditional put (``If-None-Match: *``),
  which AWS S3, MinIO and moto>=5 honour. A store that ignores the header would let two writers
  both win: point s3:// roots only at stores with conditional writes.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlparse

MANIFEST = "MANIFEST.json"
PARTIAL = ".partial"  # suffix of a local file still being written (never listed)


class ArtifactError(RuntimeError):
    """A missing artifact, or one whose content does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArtifactRoot:
    """Common logic; subclasses implement the five storage primitives below."""

    uri: str

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write (or replace) ``key``, durably and atomically."""
        raise NotImplementedError

    def create_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` only if it does not exist: FileExistsError otherwise (another writer has it)."""
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def upload(self, local: Path, key: str) -> None:
        raise NotImplementedError

    def download(self, key: str, local: Path) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix``, sorted."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return key in self.list(key)

    def put_dir(self, local_dir: str | Path, prefix: str) -> dict:
        """Upload every file under ``local_dir`` to ``prefix/``, then its manifest (written last, so
        a reader never sees a manifest naming files that are not there yet). Returns the manifest."""
        local_dir = Path(local_dir)
        # A folder fetched from a root holds that root's manifest: this upload writes its own.
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p != local_dir / MANIFEST)
        manifest = {"files": {}}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            self.upload(path, f"{prefix}/{rel}")
            manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        self.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    def get_dir(self, prefix: str, local_dir: str | Path, subfolder: str = "") -> Path:
        """Download ``prefix/`` (only its ``subfolder`` when given) into ``local_dir`` and check every file
        against the manifest."""
        local_dir = Path(local_dir)
        try:
            manifest = json.loads(self.read_bytes(f"{prefix}/{MANIFEST}"))
        except (FileNotFoundError, KeyError) as err:
            raise ArtifactError(f"{self.uri}/{prefix}: no {MANIFEST} (not written by put_dir, or incomplete)") from err
        inside = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
        files = {rel: expected for rel, expected in manifest["files"].items() if rel.startswith(inside)}
        if inside and not files:
            raise ArtifactError(f"{self.uri}/{prefix}: its {MANIFEST} lists nothing under {subfolder}/")
        for rel, expected in sorted(files.items()):
            target = local_dir / rel[len(inside):]
            target.parent.mkdir(parents=True, exist_ok=True)
            self.download(f"{prefix}/{rel}", target)
            actual = sha256_file(target)
            if actual != expected["sha256"]:
                raise ArtifactError(f"{self.uri}/{prefix}/{rel}: sha256 {actual[:12]}... does not match the "
                                    f"manifest's {expected['sha256'][:12]}...; refusing to use it")
        return local_dir


class LocalRoot(ArtifactRoot):
    """A folder on this machine (the default)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root not in path.parents and path != self.root:
            raise ValueError(f"artifact key {key!r} escapes the root {self.root}")
        return path

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
        _fsync_dir(path.parent)

    def create_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.link(tmp, path)  # EEXIST if the name is taken; the name only ever points at complete data
        except FileExistsError:
            raise FileExistsError(f"{path}: already exists") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            self._create_exclusive(path, data)  # a filesystem without hard links
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def _create_exclusive(self, path: Path, data: bytes) -> None:
        """O_CREAT | O_EXCL then write and fsync: exclusive, but a crash mid-write can leave a short
        file under the final name (readers report it as unreadable, naming it)."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise FileExistsError(f"{path}: already exists") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _write_temp(self, path: Path, data: bytes) -> Path:
        """``data`` in a fsynced temp file beside ``path``, named for this writer alone."""
        _makedirs(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{PARTIAL}")
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def upload(self, local: Path, key: str) -> None:
        path = self._path(key)
        _makedirs(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{PARTIAL}")
        shutil.copyfile(local, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def download(self, key: str, local: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ArtifactError(f"{source}: missing")
        shutil.copyfile(source, local)

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*")
                      if p.is_file() and not p.name.endswith(PARTIAL))


SSE_ENV, SSE_KMS_KEY_ENV = "TERRAHASH_S3_SSE", "TERRAHASH_S3_SSE_KMS_KEY_ID"
SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")


def sse_options(mode: str | None = None, kms_key_id: str | None = None) -> dict:
    """S3 server-side encryption for every object written (put_object's ServerSideEncryption and
    SSEKMSKeyId): the arguments, else $TERRAHASH_S3_SSE and $TERRAHASH_S3_SSE_KMS_KEY_ID; {} for the
    bucket's default."""
    mode = mode or os.environ.get(SSE_ENV) or None
    kms_key_id = kms_key_id or os.environ.get(SSE_KMS_KEY_ENV) or None
    if mode is None:
        if kms_key_id:
            raise ValueError(f"${SSE_KMS_KEY_ENV} needs ${SSE_ENV}=aws:kms (or aws:kms:dsse)")
        return {}
    if mode not in SSE_MODES:
        raise ValueError(f"S3 server-side encryption {mode!r}: one of {list(SSE_MODES)} (${SSE_ENV})")
    if kms_key_id and not mode.startswith("aws:kms"):
        raise ValueError(f"a KMS key id goes with {SSE_ENV}=aws:kms, not {mode}")
    return {"ServerSideEncryption": mode, **({"SSEKMSKeyId": kms_key_id} if kms_key_id else {})}


class S3Root(ArtifactRoot):
    """``s3://bucket/prefix`` through boto3; ``endpoint_url`` reaches any S3-compatible store. Objects are
    written with the server-side encryption of ``sse_options`` (the bucket's default without)."""

    def __init__(self, uri: str, endpoint_url: str | None = None, client=None):
        try:
            import boto3
        except ImportError:
            raise ImportError(f"{uri}: s3:// roots need boto3: pip install 'terrahash[s3]'") from None

        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URI: {uri!r}")
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = client or boto3.client("s3", endpoint_url=self.endpoint_url)
        self.sse = sse_options()

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **self.sse)

    def create_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*", **self.sse)
        except ClientError as err:
            # 412 PreconditionFailed: the key exists; 409 ConditionalRequestConflict: a concurrent
            # conditional put on the same key is in flight, and one of the two will win.
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise FileExistsError(f"{self.uri}/{key}: already exists") from None
            raise

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(f"{self.uri}/{key}") from err

    def upload(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key), ExtraArgs=dict(self.sse) or None)

    def download(self, key: str, local: Path) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.download_file(self.bucket, self._key(key), str(local))
        except ClientError as err:
            raise ArtifactError(f"{self.uri}/{key}: missing ({err})") from err

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)


def _makedirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, fsyncing each parent so the new entries last."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # another writer made it meanwhile
            continue
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so the names created or renamed in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_root(uri: str | Path, endpoint_url: str | None = None) -> ArtifactRoot:
    """The artifact root for ``uri``: ``s3://bucket/prefix`` or a local folder."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Root(text, endpoint_url)
    if "://" in text:
        raise ValueError(f"unsupported artifact root {text!r}: use a local folder or s3://bucket/prefix")
    return LocalRoot(text)


# --- folders a job writes or reads, wherever they are -------------------------------------------------


def is_remote(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def split_uri(uri: str) -> tuple[ArtifactRoot, str]:
    """(the root of ``uri``'s parent, its last name): ``s3://b/runs/x`` -> (S3Root(s3://b/runs), "x")."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    if not name or parent in ("s3:", "s3:/"):
        raise ValueError(f"{uri!r}: name a folder under a bucket, like s3://bucket/runs/name")
    return open_root(parent), name


@contextlib.contextmanager
def output_folder(uri: str | Path):
    """Where a job writes outputs that later steps read. A folder is used as it is; for ``s3://``, the
    job writes to a local staging folder that is uploaded (``put_dir``, checksummed, manifest last)
    when the block ends without an error, so a failed job publishes nothing."""
    if not is_remote(uri):
        folder = Path(uri)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    root, name = split_uri(str(uri))
    staging = Path(tempfile.mkdtemp(prefix="terrahash-out-"))
    try:
        yield staging
        root.put_dir(staging, name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _published(uri: str) -> tuple[ArtifactRoot, str, str, bytes]:
    """(root, the published folder's name, the subfolder asked for within it, its manifest) of a folder
    written by ``put_dir`` or of a folder inside one (``s3://b/runs/x/students/onnx`` of ``.../students``)."""
    parts = uri.rstrip("/").split("/")
    for cut in range(len(parts), 3, -1):  # s3://bucket/<at least one name>
        root, name = split_uri("/".join(parts[:cut]))
        try:
            return root, name, "/".join(parts[cut:]), root.read_bytes(f"{name}/{MANIFEST}")
        except (FileNotFoundError, KeyError):
            continue
    raise ArtifactError(f"{uri}: no {MANIFEST} there nor above it (not written by TerraHash, or not finished)")


def fetch_folder(uri: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder with the content of ``uri``: a folder as it is; for ``s3://``, a copy checked
    against the manifest of the published folder it is (or is inside), kept in ``cache_dir`` (a fresh
    temp folder when None) as ``<hash>/<name>`` (it keeps its name), downloaded again only when the
    content changed."""
    if not is_remote(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise FileNotFoundError(f"{uri}: no such folder")
        return folder
    root, name, subfolder, manifest = _published(str(uri))
    leaf = (subfolder or name).rstrip("/").rpartition("/")[2]
    if cache_dir is None:
        return root.get_dir(name, Path(tempfile.mkdtemp(prefix="terrahash-in-")) / leaf, subfolder)
    digest = hashlib.sha256(manifest + subfolder.encode()).hexdigest()[:20]
    target = Path(cache_dir).expanduser() / digest / leaf
    if (target / MANIFEST).is_file() and (target / MANIFEST).read_bytes() == manifest:
        return target
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}")
    temp.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.get_dir(name, temp, subfolder)
        (temp / MANIFEST).write_bytes(manifest)  # written last: it marks the copy complete
        try:
            os.rename(temp, target)
        except OSError:  # another process finished the same copy first
            if not (target / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return target

"""The artifact root: where checkpoints, models and indexes live, a local folder or ``s3://``.

Both kinds offer the same small interface, so a job never cares which one it was given.
Folders are written with a ``MANIFEST.json`` of sha256 checksums and verified when read back:
a corrupted or half-uploaded file fails loudly instead of loading.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

MANIFEST = "MANIFEST.json"


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
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        manifest = {"files": {}}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            self.upload(path, f"{prefix}/{rel}")
            manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        self.write_bytes(f"{prefix}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

    def get_dir(self, prefix: str, local_dir: str | Path) -> Path:
        """Download ``prefix/`` into ``local_dir`` and check every file against the manifest."""
        local_dir = Path(local_dir)
        try:
            manifest = json.loads(self.read_bytes(f"{prefix}/{MANIFEST}"))
        except (FileNotFoundError, KeyError) as err:
            raise ArtifactError(f"{self.uri}/{prefix}: no {MANIFEST} (not written by put_dir, or incomplete)") from err
        for rel, expected in sorted(manifest["files"].items()):
            target = local_dir / rel
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def upload(self, local: Path, key: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, path)

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
                      if p.is_file() and not p.name.endswith(".partial"))


class S3Root(ArtifactRoot):
    """``s3://bucket/prefix`` through boto3; ``endpoint_url`` reaches any S3-compatible store."""

    def __init__(self, uri: str, endpoint_url: str | None = None, client=None):
        import boto3

        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URI: {uri!r}")
        self.uri = uri.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = client or boto3.client("s3", endpoint_url=self.endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey as err:
            raise FileNotFoundError(f"{self.uri}/{key}") from err

    def upload(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

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


def open_root(uri: str | Path, endpoint_url: str | None = None) -> ArtifactRoot:
    """The artifact root for ``uri``: ``s3://bucket/prefix`` or a local folder."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Root(text, endpoint_url)
    if "://" in text:
        raise ValueError(f"unsupported artifact root {text!r}: use a local folder or s3://bucket/prefix")
    return LocalRoot(text)

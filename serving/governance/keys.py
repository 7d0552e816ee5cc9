"""API keys: created once, shown once, stored only as salted hashes, each with a role.

A key reads ``thk_<id>_<secret>``: ``id`` (8 hex digits) finds its record, ``secret`` (43 URL-safe
characters, 256 random bits) proves it. The key file (JSON, a local path or an ``s3://`` object) holds
per key its name, role, id, a random salt and sha256(salt + secret), the time it was created and, once
revoked, when. A single salted sha256 is enough here, unlike for passwords: a 256-bit random secret
cannot be guessed, so slow hashing would only slow every request down.

    {"version": 1, "keys": [{"name": "ana", "role": "reader", "id": "3f9a0c12", "salt": "<hex>",
      "sha256": "<hex>", "created": "2026-01-01T12:00:00+00:00", "revoked": null,
      "rate": null, "burst": null}]}

``rate`` and ``burst`` override the deployment's rate limit for that key (serving.governance.ratelimit).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from serving.governance.roles import ROLES

PREFIX = "thk_"
_KEY = re.compile(r"thk_([0-9a-f]{8})_([A-Za-z0-9_-]{20,128})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


class KeyFileError(ValueError):
    """A key file that cannot be read or changed as asked."""


@dataclass(frozen=True)
class Identity:
    """Who sent a request: the key's name and role (``anonymous`` when auth is off)."""

    name: str
    role: str
    rate: float | None = None
    burst: float | None = None


def _hash(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class KeyFile:
    """The key file at ``location``: a local path or ``s3://bucket/key``."""

    def __init__(self, location: str | Path):
        self.location = str(location)

    # --- storage ---

    def _split(self) -> tuple[str, str]:
        parent, _, name = self.location.rstrip("/").rpartition("/")
        return parent, name

    def read(self) -> dict:
        """The file's content; an empty key set when it does not exist yet."""
        try:
            if self.location.startswith("s3://"):
                from serving.storage import open_root

                parent, name = self._split()
                data = open_root(parent).read_bytes(name)
            else:
                data = Path(self.location).read_bytes()
        except FileNotFoundError:  # S3Root.read_bytes raises it for a missing object too
            return {"version": 1, "keys": []}
        try:
            content = json.loads(data)
            if not isinstance(content, dict) or not isinstance(content.get("keys"), list):
                raise ValueError('expected {"version": 1, "keys": [...]}')
        except ValueError as err:
            raise KeyFileError(f"{self.location}: not a key file ({err})") from None
        return content

    def _write(self, content: dict) -> None:
        data = json.dumps(content, indent=2).encode()
        if self.location.startswith("s3://"):
            from serving.storage import open_root

            parent, name = self._split()
            open_root(parent).write_bytes(name, data)
            return
        path = Path(self.location)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:  # owner only
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)

    # --- operations ---

    def create(self, name: str, role: str, rate: float | None = None, burst: float | None = None) -> str:
        """A new key for ``name`` with ``role``; returns the key, which is stored nowhere."""
        if not _NAME.fullmatch(name or ""):
            raise KeyFileError(f"key name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-'")
        if role not in ROLES:
            raise KeyFileError(f"role {role!r}: one of {list(ROLES)}")
        for value, what in ((rate, "rate"), (burst, "burst")):
            if value is not None and not value > 0:
                raise KeyFileError(f"{what} must be positive, got {value}")
        content = self.read()
        if any(k["name"] == name and not k.get("revoked") for k in content["keys"]):
            raise KeyFileError(f"{self.location}: a key named {name!r} exists; revoke it first or choose another name")
        key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        content["keys"].append({"name": name, "role": role, "id": key_id, "salt": salt, "sha256": _hash(salt, secret),
                                "created": _now(), "revoked": None, "rate": rate, "burst": burst})
        self._write(content)
        return f"{PREFIX}{key_id}_{secret}"

    def revoke(self, name: str) -> int:
        """Revoke every live key named ``name``; how many (KeyFileError when none)."""
        content = self.read()
        live = [k for k in content["keys"] if k["name"] == name and not k.get("revoked")]
        if not live:
            raise KeyFileError(f"{self.location}: no live key named {name!r}")
        for record in live:
            record["revoked"] = _now()
        self._write(content)
        return len(live)

    def list(self) -> list[dict]:
        """Every key's record without its salt and hash."""
        return [{k: v for k, v in record.items() if k not in ("salt", "sha256")} for record in self.read()["keys"]]


class KeyRing:
    """The live keys of a key file, for checking requests (``identify``): no file access per request."""

    def __init__(self, content: dict):
        self.by_id = {r["id"]: r for r in content.get("keys", []) if not r.get("revoked")}

    def identify(self, key: str) -> Identity | None:
        """The identity of ``key``, or None for a malformed, unknown or revoked key."""
        match = _KEY.fullmatch(key or "")
        record = self.by_id.get(match.group(1)) if match else None
        if record is None or not hmac.compare_digest(_hash(record["salt"], match.group(2)), record["sha256"]):
            return None
        return Identity(record["name"], record["role"], record.get("rate"), record.get("burst"))

"""Shard files encrypted at rest: AES-256-GCM (the ``cryptography`` package), one random nonce per file.

A stored file is ``b"THE1" + nonce (12 bytes) + ciphertext + tag (16 bytes)``, the file's path in the
index as associated data, so a file moved to another shard's place does not decrypt either. The
manifest's sha256 covers these stored bytes (what a node copies and checks, with no key), and its
``encryption`` field says ``{"algorithm": "AES-256-GCM", "key_id": ...}``: ``key_id`` is a fingerprint
of the key (never the key), so a wrong key is refused by name before anything is decrypted.

The key (32 random bytes, base64 in a file or a variable: ``terrahash index keygen``) comes from
``$TERRAHASH_INDEX_KEY``, else from a key file (an argument, or ``$TERRAHASH_INDEX_KEY_FILE``). It is
never written beside the index: a build refuses a key file inside the index's own folder.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path

KEY_ENV, KEY_FILE_ENV = "TERRAHASH_INDEX_KEY", "TERRAHASH_INDEX_KEY_FILE"
ALGORITHM = "AES-256-GCM"
MAGIC = b"THE1"
NONCE_BYTES = 12


class IndexKeyError(ValueError):
    """No key for an encrypted index, a wrong key, or a file that does not decrypt with it."""


def new_key() -> str:
    """A new random key, base64 (what a key file or $TERRAHASH_INDEX_KEY holds)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def write_key_file(path: str | Path) -> str:
    """A new key in a new file readable by its owner only; returns the key's id."""
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key_id(_decode(key, str(path)))


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise IndexKeyError(f"{where}: not an index key (base64 of 32 bytes; `terrahash index keygen FILE` makes one)")
    return key


def load_key(key_file: str | Path | None = None) -> bytes | None:
    """The key: $TERRAHASH_INDEX_KEY, else ``key_file``, else $TERRAHASH_INDEX_KEY_FILE; None without any."""
    if os.environ.get(KEY_ENV):
        return _decode(os.environ[KEY_ENV], f"${KEY_ENV}")
    path = key_file or os.environ.get(KEY_FILE_ENV)
    if not path:
        return None
    try:
        return _decode(Path(path).read_text(), str(path))
    except FileNotFoundError:
        raise IndexKeyError(f"index key file {path} not found") from None


def key_id(key: bytes) -> str:
    """A fingerprint of the key, safe to store: it says which key, and reveals nothing of it."""
    return hashlib.sha256(b"terrahash-index-key-id:" + key).hexdigest()[:16]


class Cipher:
    """Seal and open shard files with one key."""

    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.aead, self.key_id = AESGCM(key), key_id(key)

    def describe(self) -> dict:
        """The manifest's ``encryption`` field."""
        return {"algorithm": ALGORITHM, "key_id": self.key_id}

    def seal(self, data: bytes, path: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC + nonce + self.aead.encrypt(nonce, data, path.encode())

    def open(self, blob: bytes, path: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if not blob.startswith(MAGIC):
            raise IndexKeyError(f"{path}: not an encrypted shard file")
        nonce, body = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES], blob[len(MAGIC) + NONCE_BYTES:]
        try:
            return self.aead.decrypt(nonce, body, path.encode())
        except InvalidTag:
            raise IndexKeyError(f"{path}: does not decrypt with key {self.key_id} (another key, or the file was "
                                f"moved or altered)") from None


def cipher_for(manifest: dict, key_file: str | Path | None = None) -> Cipher | None:
    """The cipher of an encrypted index version (None for a plain one): IndexKeyError without its key or
    with another key, naming both key ids."""
    encryption = manifest.get("encryption")
    if not encryption:
        return None
    where = f"{manifest.get('collection')}/{manifest.get('version')}"
    if encryption.get("algorithm") != ALGORITHM:
        raise IndexKeyError(f"{where}: encrypted with {encryption.get('algorithm')!r}, which this version cannot read")
    key = load_key(key_file)
    if key is None:
        raise IndexKeyError(f"{where} is encrypted ({ALGORITHM}, key id {encryption['key_id']}): set ${KEY_ENV} or "
                            f"${KEY_FILE_ENV} (serving: index_key_file) to its key")
    cipher = Cipher(key)
    if cipher.key_id != encryption["key_id"]:
        raise IndexKeyError(f"{where} is encrypted with key {encryption['key_id']}, and the key given is "
                            f"{cipher.key_id}: wrong key, nothing decrypted")
    return cipher


def check_key_outside(key_file: str | Path | None, index_root: str) -> None:
    """Refuse a key file kept inside the index's own folder (whoever copies the index would get the key)."""
    if not key_file or "://" in str(index_root):
        return
    key, root = Path(key_file).resolve(), Path(index_root).resolve()
    if root == key.parent or root in key.parents:
        raise IndexKeyError(f"the index key {key_file} is inside the index root {index_root}: keep it elsewhere")

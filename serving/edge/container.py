"""The bundle file: a zip archive of stored (uncompressed) members, each starting on a 64-byte boundary, with
a manifest ``bundle.json`` first.

Why a zip: any tool lists and extracts it (``unzip -l bundle.thb``), and stored members can be memory-mapped
where they lie, so a million codes cost no reading at start and no copy in memory. ``.npy`` members are
arrays (their data then starts 64-byte aligned, as numpy's header pads it to the member's start); other
members are bytes (UTF-8 strings, ONNX models, JSON).

``bundle.json`` holds ``format``, what the bundle is (release, code space, collections, encoders) and
``members``: every other member's sha256 and size, of the bytes as stored. Opening a bundle reads the
central directory and the manifest, refuses a member that is missing, not listed, listed twice, compressed
or altered (naming it), and only then maps anything. With ``encryption`` (AES-256-GCM with the index's key,
serving.index.crypto), each member is sealed with its name as associated data; such members are decrypted
into memory at open, so nothing of them is mapped.

Only the standard library and numpy are imported here (``cryptography`` only for an encrypted bundle).
"""
from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import secrets
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FORMAT = "terrahash-bundle/1"
MANIFEST = "bundle.json"
ALIGN = 64  # numpy's own array alignment (np.lib.format.ARRAY_ALIGN)
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # a zip local file header, 30 bytes
_LOCAL_SIGNATURE = 0x04034B50
_PAD_RECORD = 0xD935  # the extra-field id Android's zipalign pads with: readers skip it
_EPOCH = (2020, 1, 1, 0, 0, 0)  # every member's time, so that the same inputs give the same file
_HASH_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_NPY_HEADER = 4096


class BundleError(ValueError):
    """A bundle that cannot be used: not a bundle, damaged, altered, of another code space, or needing a key."""


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as a ``.npy`` file's bytes (no pickles)."""
    out = io.BytesIO()
    np.lib.format.write_array(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def write_container(path: str | Path, manifest: dict, members: dict[str, bytes], cipher=None) -> dict:
    """Write ``manifest`` (plus ``members``' checksums) and ``members`` to ``path`` atomically; returns the
    manifest as written. ``cipher`` (serving.index.crypto.Cipher) seals every member but the manifest."""
    if MANIFEST in members:
        raise ValueError(f"{MANIFEST} is the manifest's own name")
    manifest = {**manifest, "format": FORMAT, "bundle_id": secrets.token_hex(8) if cipher is not None else None}
    stored = {name: cipher.seal(data, sealed_name(manifest, name)) if cipher is not None else bytes(data)
              for name, data in members.items()}
    manifest = {**manifest, "encryption": cipher.describe() if cipher is not None else None,
                "members": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                            for name, data in sorted(stored.items())}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
                _add(archive, f, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
                for name in sorted(stored):
                    _add(archive, f, name, stored[name])
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a file written with open(): mkstemp makes it private
        os.replace(tmp, path)  # readers see the old bundle or the new one: a mapped file is never rewritten
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _add(archive: zipfile.ZipFile, f, name: str, data: bytes) -> None:
    """One stored member whose data starts on an ALIGN boundary (an extra-field record pads the header)."""
    info = zipfile.ZipInfo(name, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    zip64 = len(data) * 1.05 > zipfile.ZIP64_LIMIT  # zipfile then adds a 20-byte zip64 record after ours
    header_end = f.tell() + _LOCAL_HEADER.size + len(name.encode()) + 4 + (20 if zip64 else 0)
    pad = (-header_end) % ALIGN
    info.extra = struct.pack("<HH", _PAD_RECORD, pad) + b"\0" * pad
    archive.writestr(info, data)


class Container:
    """An open bundle: ``manifest``, and each member's bytes (``read``) or array (``array``, memory-mapped
    unless the bundle is encrypted). Every member is checked against the manifest when it is opened.

    The file is opened and mapped once: a bundle replaced on disk while open (``terrahash bundle --out`` the
    same name) is not seen, and the one checked at open is the one answered from."""

    def __init__(self, path: str | Path, key_file: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"{self.path}: no such bundle file")
        self._file = open(self.path, "rb")
        try:
            self._open(key_file)
        except BaseException:
            self.close()
            raise

    def _open(self, key_file) -> None:
        try:
            infos = zipfile.ZipFile(self._file).infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
            raise BundleError(f"{self.path}: not a readable bundle: {err}") from None
        by_name = {i.filename: i for i in infos}
        if MANIFEST not in by_name:
            raise BundleError(f"{self.path}: not a TerraHash bundle (no {MANIFEST})")
        size = os.fstat(self._file.fileno()).st_size
        info = by_name[MANIFEST]
        start = self._data_offset(info, size)
        if info.file_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{self.path}: its {MANIFEST} is {info.file_size} bytes, more than a bundle's manifest "
                              f"can be ({MAX_MANIFEST_BYTES})")
        self._file.seek(start)
        try:
            self.manifest = json.loads(self._file.read(info.file_size))
        except (ValueError, RecursionError) as err:
            raise BundleError(f"{self.path}: {MANIFEST} is not valid JSON: {err}") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            found = self.manifest.get("format") if isinstance(self.manifest, dict) else None
            raise BundleError(f"{self.path}: format {found!r} is not {FORMAT!r}, which this version reads")
        self._spans = self._check_members(infos, size)
        self._cipher = self._cipher_for(key_file)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._plain: dict[str, bytes] = {}

    def close(self) -> None:
        """Let go of the file (arrays already handed out keep their mapping alive)."""
        self._file.close()

    def _check_members(self, infos, size: int) -> dict[str, tuple[int, int]]:
        """Each listed member's (data offset, size), after checking the archive holds exactly the listed
        members, stored, each with its recorded sha256."""
        listed = self.manifest.get("members")
        if not isinstance(listed, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                for v in listed.values()):
            raise BundleError(f"{self.path}: {MANIFEST} lists no members, or not as {{name: {{sha256, bytes}}}}")
        seen: set[str] = set()
        for info in infos:
            if info.filename in seen:
                raise BundleError(f"{self.path}: member {info.filename} appears twice")
            seen.add(info.filename)
        extra = sorted(seen - set(listed) - {MANIFEST})
        if extra:
            raise BundleError(f"{self.path}: member {extra[0]} is not in {MANIFEST} (the bundle was altered)")
        missing = sorted(set(listed) - seen)
        if missing:
            raise BundleError(f"{self.path}: member {missing[0]} is missing (the bundle is incomplete)")
        spans = {}
        for info in infos:
            if info.filename == MANIFEST:
                continue
            start = self._data_offset(info, size)
            expected = listed[info.filename]
            if info.file_size != expected["bytes"]:
                raise BundleError(f"{self.path}: member {info.filename} has {info.file_size} bytes, {MANIFEST} says "
                                  f"{expected['bytes']} (the bundle was altered)")
            if _sha256_range(self._file, start, info.file_size) != expected["sha256"]:
                raise BundleError(f"{self.path}: member {info.filename} does not match its sha256 in {MANIFEST} "
                                  f"(the bundle was altered or damaged)")
            spans[info.filename] = (start, info.file_size)
        return spans

    def _data_offset(self, info: zipfile.ZipInfo, size: int) -> int:
        """Where a member's data starts, from its local header; it must be stored and lie inside the file."""
        where = f"{self.path}: member {info.filename}"
        if not 0 <= info.header_offset <= size - _LOCAL_HEADER.size:
            raise BundleError(f"{where}: its header lies outside the file (the bundle is cut or damaged)")
        self._file.seek(info.header_offset)
        signature, _, flags, method, *_, name_length, extra_length = _LOCAL_HEADER.unpack(
            self._file.read(_LOCAL_HEADER.size))
        if signature != _LOCAL_SIGNATURE:
            raise BundleError(f"{where}: no zip header where the directory says (the bundle is damaged)")
        if method != zipfile.ZIP_STORED or flags & 1 or info.compress_type != zipfile.ZIP_STORED:
            raise BundleError(f"{where} is compressed or zip-encrypted; a bundle stores its members as they are")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > size:
            raise BundleError(f"{where}: its data runs past the end of the file (the bundle is cut)")
        return start

    def _cipher_for(self, key_file):
        encryption = self.manifest.get("encryption")
        if not encryption:
            if key_file is not None:
                raise BundleError(f"{self.path} is not encrypted, and a key was given: refusing a bundle that "
                                  f"should have been sealed")
            return None
        from serving.index.crypto import IndexKeyError, cipher_for

        try:
            return cipher_for({"encryption": encryption, "collection": "bundle", "version": self.path.name}, key_file)
        except IndexKeyError as err:
            raise BundleError(str(err)) from None
        except ImportError:
            raise BundleError(f"{self.path} is encrypted: install the cryptography package to open it "
                              f"(pip install cryptography)") from None

    def __contains__(self, name: str) -> bool:
        return name in self._spans

    def read(self, name: str) -> bytes:
        """A member's bytes (decrypted)."""
        if name in self._plain:
            return self._plain[name]
        start, size = self._span(name)
        data = self._map[start:start + size] if size else b""
        if self._cipher is not None:
            from serving.index.crypto import IndexKeyError

            try:
                data = self._plain[name] = self._cipher.open(data, sealed_name(self.manifest, name))
            except IndexKeyError as err:
                raise BundleError(f"{self.path}: {err}") from None
        return data

    def bytes_view(self, name: str):
        """A member's bytes without reading them: a uint8 array over the map (or the decrypted bytes)."""
        if self._cipher is not None:
            return self.read(name)
        start, size = self._span(name)
        return np.frombuffer(self._map, np.uint8, count=size, offset=start) if size else b""

    def array(self, name: str) -> np.ndarray:
        """A ``.npy`` member: read-only, over the map in place (or decrypted into memory)."""
        data = self.read(name) if self._cipher is not None else self.bytes_view(name)
        stream = io.BytesIO(bytes(data[:MAX_NPY_HEADER]))
        try:
            version = np.lib.format.read_magic(stream)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(stream) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(stream))
        except (ValueError, EOFError) as err:
            raise BundleError(f"{self.path}: member {name} is not an array: {err}") from None
        offset = stream.tell()
        count = int(np.prod(shape))
        if dtype.hasobject or fortran or offset + dtype.itemsize * count != len(data):
            raise BundleError(f"{self.path}: member {name} is not a plain array of the size it claims")
        if isinstance(data, bytes):
            return np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
        start, _ = self._span(name)
        return np.frombuffer(self._map, dtype, count=count, offset=start + offset).reshape(shape)

    def _span(self, name: str) -> tuple[int, int]:
        try:
            return self._spans[name]
        except KeyError:
            raise BundleError(f"{self.path}: no member {name}") from None


def sealed_name(manifest: dict, name: str) -> str:
    """What a member is sealed with as associated data: the bundle's id and the member's name, so that a member
    of another bundle sealed with the same key does not open in this one."""
    return f"{manifest.get('bundle_id', '')}/{name}"


def _sha256_range(f, start: int, size: int) -> str:
    """sha256 of ``size`` bytes from ``start``, read in chunks (not through a map, which would stay resident)."""
    digest = hashlib.sha256()
    f.seek(start)
    left = size
    while left:
        chunk = f.read(min(_HASH_CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()

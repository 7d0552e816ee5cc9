"""Releases: the image and caption versions published together (``index/releases/rNNNN.json``), with the
sha256 of each manifest, the model version and the code space; created last and exclusively, so a crash
at any point leaves the previous release the latest. Serving reads releases (``resolve_release``,
``load_index``), never the latest version of each collection on its own."""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone


from serving.index.files import (INDEX_PREFIX, MANIFEST_NAME, MAX_CLAIM_TRIES, RELEASES, IndexVersionError,
                                 _check_collection, _collection_key, _open, _read_json)
from serving.index.shards import ShardedIndex
from serving.index.versions import add_to_index, latest_version, load_shard, read_manifest, verify_index, VerifyReport
from serving.model.codes import BIT_ORDER
from serving.storage import ArtifactRoot

log = logging.getLogger(__name__)


RELEASE_FORMAT = "terrahash-release/1"
_RELEASE = re.compile(r"r(\d{4,})")


class ReleaseConflictError(FileExistsError):
    """The release number asked for was published by another writer first."""


def publish_release(root, manifests: dict, *, base_release: str | None = None, release: str | None = None) -> dict:
    """Publish a release naming the index versions in ``manifests`` ({"images": manifest, "captions":
    manifest or None}); returns it.

    Written last, after the versions it names are complete: ``index/releases/rNNNN.json`` =
    {format, release, base_release, created, model_version, code_space, bits, collections:
    {name: {version, manifest_sha256, rows}}}, and ``model`` ({uri: "models:/NAME/VERSION", name,
    version}) when the image manifest records a registered model version (``extra.model``). Created exclusively (a local hard link of a fsynced
    file, or a conditional put on S3): with ``release`` given, exactly that name or
    ReleaseConflictError if another writer took it; otherwise the next free number.
    """
    root = _open(root)
    if not manifests.get("images"):
        raise IndexVersionError("a release needs an image index version")
    chosen = {name: m for name, m in manifests.items() if m is not None}
    model_versions = {m["model_version"] for m in chosen.values()}
    code_spaces = {m.get("code_space") for m in chosen.values()} - {None}
    if len(model_versions) > 1 or len(code_spaces) > 1:
        raise IndexVersionError(f"the versions {sorted((n, m['version']) for n, m in chosen.items())} come from "
                                f"different models ({sorted(model_versions)}, code spaces {sorted(code_spaces)}); "
                                f"one release serves one model")
    collections = {}
    for name, manifest in sorted(chosen.items()):
        key = _collection_key(_check_collection(name), f"{manifest['version']}/{MANIFEST_NAME}")
        stored = root.read_bytes(key)  # what serving will read, pinned by its checksum
        collections[name] = {"version": manifest["version"], "manifest_sha256": hashlib.sha256(stored).hexdigest(),
                             "rows": int(manifest["rows"])}
    images = chosen["images"]
    body = {"format": RELEASE_FORMAT, "base_release": base_release,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_version": images["model_version"], "code_space": images.get("code_space"),
            "bits": images["bits"], "bit_order": images.get("bit_order", BIT_ORDER), "collections": collections}
    if images.get("extra", {}).get("model"):  # the registered model version the codes came from
        body["model"] = dict(images["extra"]["model"])
    if release is not None:
        _check_release_name(release)
        names = [release]
    else:
        start = int(_next_release(root)[1:])
        names = (f"r{n:04d}" for n in range(start, start + MAX_CLAIM_TRIES))
    for name in names:
        data = {**body, "release": name}
        try:
            root.create_bytes(_release_key(name), json.dumps(data, indent=2, sort_keys=True).encode())
            return data
        except FileExistsError:
            if release is not None:
                raise ReleaseConflictError(f"{root.uri}/{_release_key(name)}: release {name} was published by "
                                           f"another writer") from None
    raise IndexVersionError(f"{root.uri}: no free release number after {MAX_CLAIM_TRIES} tries")


def list_releases(root) -> list[str]:
    """The published releases under ``root``, oldest first."""
    root = _open(root)
    found = []
    for key in root.list(f"{INDEX_PREFIX}/{RELEASES}/"):
        name = key.rsplit("/", 1)[-1]
        if key.count("/") == 2 and name.endswith(".json") and _RELEASE.fullmatch(name[:-5]):
            found.append(name[:-5])
    return sorted(found, key=lambda r: int(r[1:]))


def latest_release(root) -> str:
    """The newest release (the highest number)."""
    releases = list_releases(root)
    if not releases:
        raise IndexVersionError(f"no releases under {_open(root).uri}/{INDEX_PREFIX}/{RELEASES}/ (an index written "
                                f"before releases existed: rebuild it with `terrahash index build`, or publish one "
                                f"with `terrahash index release`)")
    return releases[-1]


def read_release(root, release: str) -> dict:
    """The release file ``release`` (e.g. "r0003"); IndexVersionError naming the file if it is missing,
    truncated or not a release."""
    root = _open(root)
    key = _release_key(_check_release_name(release))
    data = _read_json(root, key, "release")
    if data.get("format") != RELEASE_FORMAT or not isinstance(data.get("collections"), dict) \
            or "images" not in data["collections"]:
        raise IndexVersionError(f"{root.uri}/{key}: not a {RELEASE_FORMAT} file naming an image index version")
    return data


def resolve_release(root, release: str | None = None, *, image_version: str | None = None,
                    caption_version: str | None = None) -> dict:
    """What serving serves: {"release": name or None, "images": manifest, "captions": manifest}, the
    "captions" key absent when the release has no caption index.

    ``release`` defaults to the latest. Each manifest is checked against the sha256 the release
    recorded for it. ``image_version`` / ``caption_version`` (the serve settings of the same names)
    override the release's version of that collection; with no release under ``root`` at all, an
    ``image_version`` alone is enough (and captions are served only if ``caption_version`` names
    them). The versions served must come from one model (model_version and code space), else
    IndexVersionError. Truncated or missing files are IndexVersionErrors naming the file.
    """
    root = _open(root)
    chosen: dict[str, str] = {}
    record: dict = {"collections": {}}
    name = release
    if release is not None or image_version is None or list_releases(root):
        name = release or latest_release(root)
        record = read_release(root, name)
        chosen = {c: entry["version"] for c, entry in record["collections"].items()}
    chosen.update({c: v for c, v in (("images", image_version), ("captions", caption_version)) if v})
    result: dict = {"release": name}
    for collection in ("images", "captions"):
        if collection not in chosen:
            continue
        manifest = read_manifest(root, chosen[collection], collection)
        pinned = record["collections"].get(collection, {})
        if pinned.get("version") == chosen[collection]:
            key = _collection_key(collection, f"{chosen[collection]}/{MANIFEST_NAME}")
            actual = hashlib.sha256(root.read_bytes(key)).hexdigest()
            if actual != pinned["manifest_sha256"]:
                raise IndexVersionError(f"{root.uri}/{key}: sha256 {actual[:12]}... is not the "
                                        f"{pinned['manifest_sha256'][:12]}... release {name} published")
        result[collection] = manifest
    images, captions = result["images"], result.get("captions")
    if captions is not None and (captions["model_version"] != images["model_version"]
                                 or captions.get("code_space") != images.get("code_space")):
        raise IndexVersionError(f"caption index {captions['version']} was built with model "
                                f"{captions['model_version']!r} (code space {captions.get('code_space')}), image index "
                                f"{images['version']} with {images['model_version']!r} "
                                f"(code space {images.get('code_space')}); they cannot be served together")
    return result


MAX_REBASES = 8  # an add whose release number another writer took first is redone on the newer release


def add_release(root, additions: dict, *, base_release: str | None = None, model_version: str | None = None,
                code_space: str | None = None, image_root: str | None = None, extra: dict | None = None,
                key_file=None) -> dict:
    """Add items to the collections of a release and publish the release of the result; returns
    {"release": release, "images": manifest, "captions": manifest or None}.

    ``additions``: {collection: {"codes": packed (n, bits // 8), "ids": [...], "image_ids": [...],
    "texts": [...], "metadata": [...]}} ("image_ids" for captions; "texts" are stored when the base
    collection keeps texts; "metadata" as for build_index). Collections of the base not in ``additions`` are carried over unchanged; each added
    collection gets a new version (add_to_index, with ``image_root`` for the new rows). Without
    ``base_release`` the base is the latest release and the new one must directly follow it: when
    another writer published that number first, the add is redone on the newer release, so
    concurrent adds all end up in the latest release (an id both added is refused). With
    ``base_release`` the new release takes the next free number.
    """
    root = _open(root)
    base = resolve_release(root, base_release)
    for _ in range(MAX_REBASES):
        manifests = {c: base.get(c) for c in ("images", "captions")}
        for collection, items in sorted(additions.items()):
            if base.get(collection) is None:
                raise IndexVersionError(f"release {base['release']} has no {collection!r} index to add to")
            manifests[collection] = add_to_index(
                root, base[collection]["version"], items["codes"], items["ids"], collection=collection,
                new_image_ids=items.get("image_ids"),
                new_texts=items.get("texts") if base[collection].get("has_texts") else None,
                new_metadata=items.get("metadata"),
                model_version=model_version, code_space=code_space, image_root=image_root, extra=extra,
                key_file=key_file)
        following = None if base_release is not None else f"r{int(base['release'][1:]) + 1:04d}"
        try:
            return {"release": publish_release(root, manifests, base_release=base["release"], release=following),
                    **manifests}
        except ReleaseConflictError as err:
            log.info("%s; adding again to the newer release", err)
            base = resolve_release(root)
    raise IndexVersionError(f"{root.uri}: {MAX_REBASES} other writers published first; try again")


@dataclass
class ReleaseReport:
    """What verify_release found: one VerifyReport per collection, and problems of the release itself."""

    release: str
    collections: dict[str, VerifyReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(report.ok for report in self.collections.values())

    def __str__(self) -> str:
        versions = ", ".join(f"{c} {r.version}" for c, r in self.collections.items())
        lines = [f"release {self.release} ({versions}): {'all good' if self.ok else 'PROBLEMS'}"]
        lines += [f"  {p}" for p in self.problems] + [f"  {r}" for r in self.collections.values()]
        return "\n".join(lines)


def verify_release(root, release: str | None = None, collections: Sequence[str] | None = None,
                   key_file=None) -> ReleaseReport:
    """Check a release (default: the latest): its file, each manifest's sha256, every shard of every
    collection it names (or of those of ``collections`` it names). Unreadable files are reported, not raised."""
    root = _open(root)
    name = release or latest_release(root)
    report = ReleaseReport(name)
    try:
        record = read_release(root, name)
    except IndexVersionError as err:
        report.problems.append(str(err))
        return report
    for collection, entry in sorted(record["collections"].items()):
        if collections is not None and collection not in collections:
            continue
        key = _collection_key(collection, f"{entry['version']}/{MANIFEST_NAME}")
        try:
            actual = hashlib.sha256(root.read_bytes(key)).hexdigest()
            if actual != entry["manifest_sha256"]:
                report.problems.append(f"{root.uri}/{key}: sha256 {actual[:12]}... is not the release's "
                                       f"{entry['manifest_sha256'][:12]}...")
            report.collections[collection] = verify_index(root, entry["version"], collection, key_file)
        except (FileNotFoundError, IndexVersionError) as err:
            report.problems.append(f"{collection} {entry['version']}: {err}")
    return report


def _release_key(release: str) -> str:
    return f"{INDEX_PREFIX}/{RELEASES}/{release}.json"


def _check_release_name(release: str) -> str:
    if not isinstance(release, str) or not _RELEASE.fullmatch(release):
        raise IndexVersionError(f"not a release name: {release!r} (expected like 'r0001')")
    return release


def _next_release(root: ArtifactRoot) -> str:
    """One past the highest release present."""
    releases = list_releases(root)
    return f"r{int(releases[-1][1:]) + 1 if releases else 1:04d}"


def default_version(root, collection: str = "images") -> str:
    """The version of ``collection`` the latest release names; with no release at all (an index
    written before releases existed), the latest complete version."""
    root = _open(root)
    if list_releases(root):
        name = latest_release(root)
        entry = read_release(root, name)["collections"].get(collection)
        if entry is None:
            raise IndexVersionError(f"{root.uri}: release {name} has no {collection!r} index")
        return entry["version"]
    return latest_version(root, collection)


def load_index(root, version: str | None = None, collection: str = "images",
               search_params: dict | None = None, key_file=None) -> ShardedIndex:
    """Every shard of ``version`` (default: ``default_version``), checked and ready to search."""
    root, collection = _open(root), _check_collection(collection)
    version = version or default_version(root, collection)
    manifest = read_manifest(root, version, collection)
    shards = [load_shard(root, version, entry["name"], collection, search_params, key_file)
              for entry in manifest["shards"]]
    return ShardedIndex(shards, manifest)

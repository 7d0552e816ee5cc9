"""Releases: index versions claimed and published exclusively and durably, read back as one release."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.model.codes import random_codes
from serving.index.files import CLAIM_NAME, IndexVersionError
from serving.index.refs import ImageRefs
from serving.index.releases import (ReleaseConflictError, add_release, default_version, latest_release,
                                    list_releases, load_index, publish_release, read_release, resolve_release,
                                    verify_release)
from serving.index.versions import build_index, list_versions, read_manifest

REPO = Path(__file__).resolve().parents[3]
BITS = 32


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def ids_for(n, start=0, prefix="scene"):
    return [f"{prefix}_{i:05d}" for i in range(start, start + n)]


def build_pair(root, n=60, shards=3, model="m1", space="sha256:space-1", image_root="/data/a", seed=1):
    """An image and a caption index of one model, published as one release."""
    ids = ids_for(n)
    images = build_index(random_codes(n, BITS, seed=seed), ids, BITS, shards, root, model_version=model,
                         code_space=space, image_root=image_root, extra={"image_root": image_root})
    captions = build_index(random_codes(2 * n, BITS, seed=seed + 1), [f"{i}#{k}" for i in ids for k in (0, 1)],
                           BITS, shards, root, collection="captions", image_ids=[i for i in ids for _ in (0, 1)],
                           texts=[f"words {k}" for _ in ids for k in (0, 1)], model_version=model, code_space=space,
                           image_root=image_root)
    return publish_release(root, {"images": images, "captions": captions})


# --- publishing and resolving ----------------------------------------------------------------------


@pytest.mark.parametrize("root_name", ["local_root", "s3_root"])
def test_a_release_names_both_versions_and_is_what_serving_reads(root_name, request):
    root = request.getfixturevalue(root_name)
    first = build_pair(root)
    assert first["release"] == "r0001" and first["base_release"] is None
    assert {c: e["version"] for c, e in first["collections"].items()} == {"images": "v0001", "captions": "v0001"}
    assert first["model_version"] == "m1" and first["code_space"] == "sha256:space-1" and first["bits"] == BITS
    assert read_release(root, "r0001") == first
    # A newer image version alone (a build that crashed before its captions and its release) is not served.
    build_index(random_codes(5, BITS, seed=9), ids_for(5), BITS, 3, root, model_version="m1", code_space="sha256:space-1")
    assert list_versions(root) == ["v0001", "v0002"]
    served = resolve_release(root)
    assert served["release"] == "r0001"
    assert served["images"]["version"] == served["captions"]["version"] == "v0001"
    assert default_version(root) == "v0001" and len(load_index(root).shards) == 3
    # Explicit per-collection overrides stay possible.
    assert resolve_release(root, image_version="v0002")["images"]["version"] == "v0002"
    assert verify_release(root).ok


def test_a_release_of_two_models_is_refused(local_root):
    images = build_index(random_codes(10, BITS), ids_for(10), BITS, 2, local_root, model_version="m1", code_space="a")
    captions = build_index(random_codes(10, BITS), ids_for(10), BITS, 2, local_root, collection="captions",
                           image_ids=ids_for(10), model_version="m2", code_space="b")
    with pytest.raises(IndexVersionError, match="different models"):
        publish_release(local_root, {"images": images, "captions": captions})
    assert list_releases(local_root) == []


def test_a_root_without_releases_is_a_clear_error(local_root):
    build_index(random_codes(10, BITS), ids_for(10), BITS, 2, local_root, model_version="m1")
    with pytest.raises(IndexVersionError, match="no releases under .*terrahash index release"):
        resolve_release(local_root)
    assert resolve_release(local_root, image_version="v0001") == {"release": None,
                                                                  "images": read_manifest(local_root, "v0001")}


@pytest.mark.parametrize("content", [b"", b'{"format": "terrahash-index/1", "collec'])
def test_a_truncated_manifest_is_an_error_naming_the_file(local_root, content):
    build_pair(local_root)
    manifest = Path(local_root.uri) / "index" / "captions" / "v0001" / "manifest.json"
    manifest.write_bytes(content)
    with pytest.raises(IndexVersionError, match=r"index/captions/v0001/manifest.json: unreadable index version"):
        read_manifest(local_root, "v0001", "captions")
    with pytest.raises(IndexVersionError, match=r"captions/v0001/manifest.json"):
        resolve_release(local_root)
    report = verify_release(local_root)
    assert not report.ok and "captions/v0001/manifest.json" in str(report)


def test_a_truncated_release_is_an_error_naming_the_file(local_root):
    build_pair(local_root)
    (Path(local_root.uri) / "index" / "releases" / "r0001.json").write_bytes(b'{"format": "terrahash-rel')
    with pytest.raises(IndexVersionError, match=r"index/releases/r0001.json: unreadable release"):
        resolve_release(local_root)
    assert "r0001.json" in str(verify_release(local_root))


def test_a_manifest_changed_after_its_release_is_refused(local_root):
    build_pair(local_root)
    path = Path(local_root.uri) / "index" / "images" / "v0001" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "rows": 1}))
    with pytest.raises(IndexVersionError, match="is not the .* release r0001 published"):
        resolve_release(local_root)


# --- exclusivity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("root_name", ["local_root", "s3_root"])
def test_version_numbers_and_release_names_are_claimed_exclusively(root_name, request):
    root = request.getfixturevalue(root_name)
    # Another writer holds v0001 of the images (its claim, no manifest yet): a build takes v0002.
    root.create_bytes(f"index/images/v0001/{CLAIM_NAME}", b"{}")
    manifest = build_index(random_codes(8, BITS), ids_for(8), BITS, 2, root, model_version="m1")
    assert manifest["version"] == "v0002"
    first = publish_release(root, {"images": manifest})
    assert first["release"] == "r0001"
    with pytest.raises(ReleaseConflictError, match="r0001"):
        publish_release(root, {"images": manifest}, release="r0001")
    assert read_release(root, "r0001") == first  # the first one stands
    assert publish_release(root, {"images": manifest})["release"] == "r0002"


@pytest.mark.parametrize("root_name", ["local_root", "s3_root"])
def test_an_add_that_loses_the_race_is_redone_on_the_newer_release(root_name, request, monkeypatch):
    """Another add publishes the release number this add was going to take: this one is redone on it."""
    import serving.index.releases as releases_module

    root = request.getfixturevalue(root_name)
    build_pair(root)
    real_publish, calls = releases_module.publish_release, []

    def publish_after_a_rival(*args, **kwargs):
        if not calls:  # the rival's add runs between this add's base and its publish
            calls.append("rival")
            add_release(root, {"images": {"codes": random_codes(2, BITS, seed=5), "ids": ["rival_a", "rival_b"]}})
        calls.append(kwargs.get("release"))
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(releases_module, "publish_release", publish_after_a_rival)
    mine = add_release(root, {"images": {"codes": random_codes(2, BITS, seed=6), "ids": ["mine_a", "mine_b"]}},
                       image_root="/data/b")
    assert calls == ["rival", "r0002", "r0002", "r0003"]  # the rival's, mine refused, mine again
    assert mine["release"]["release"] == "r0003" and mine["release"]["base_release"] == "r0002"
    ids = set(load_index(root).ids(np.arange(64)).tolist())
    assert {"rival_a", "rival_b", "mine_a", "mine_b"} <= ids
    assert mine["captions"]["version"] == "v0001"  # carried over: nothing was added to it
    assert verify_release(root, "r0002").ok and verify_release(root, "r0003").ok


def _add_in_process(uri, prefix, start, results):
    """One of two processes adding to the latest release at the same moment."""
    start.wait()
    try:
        result = add_release(uri, {"images": {"codes": random_codes(20, BITS, seed=len(prefix)),
                                              "ids": ids_for(20, prefix=prefix)}})
        results.put((prefix, result["release"]["release"], result["images"]["version"]))
    except Exception as err:  # reported to the test, which fails with it
        results.put((prefix, "error", repr(err)))


def test_two_adds_at_once_publish_two_releases_that_both_verify(local_root):
    build_pair(local_root)
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=_add_in_process, args=(local_root.uri, prefix, start, results))
               for prefix in ("left", "right")]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert all(outcome[1] != "error" for outcome in outcomes), outcomes
    assert sorted(o[1] for o in outcomes) == ["r0002", "r0003"]
    assert len({o[2] for o in outcomes}) == 2  # two image versions, never one number twice
    assert list_releases(local_root) == ["r0001", "r0002", "r0003"]
    for release in ("r0002", "r0003"):
        assert verify_release(local_root, release).ok
    latest = load_index(local_root)
    ids = set(latest.ids(np.arange(latest.manifest["next_row"])).tolist())
    assert set(ids_for(20, prefix="left")) | set(ids_for(20, prefix="right")) <= ids  # both adds are in it


# --- crashes -----------------------------------------------------------------------------------------

CRASHING_BUILD = r"""
import sys, time
import serving.index.versions as index
from serving.index.releases import publish_release
from serving.model.codes import random_codes

root, n = sys.argv[1], 400
real = index._write_shard
def slow_shard(*args):
    entry = real(*args)
    print(f"wrote {args[1]} {args[2]} {entry['name']}", flush=True)
    time.sleep(0.05)
    return entry
index._write_shard = slow_shard
ids = [f"new_{i:05d}" for i in range(n)]
images = index.build_index(random_codes(n, 32, seed=3), ids, 32, 16, root, model_version="m1",
                           code_space="sha256:space-1")
print("images manifest written", flush=True)
captions = index.build_index(random_codes(n, 32, seed=4), ids, 32, 16, root, collection="captions",
                             image_ids=ids, model_version="m1", code_space="sha256:space-1")
publish_release(root, {"images": images, "captions": captions})
print("released", flush=True)
"""


def test_a_build_killed_while_it_writes_leaves_the_previous_release_served(local_root, tmp_path):
    before = build_pair(local_root)
    script = tmp_path / "crashing_build.py"
    script.write_text(CRASHING_BUILD)
    process = subprocess.Popen([sys.executable, str(script), local_root.uri], cwd=REPO, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = []
    for line in process.stdout:  # kill it in the middle of the captions, after the new images are complete
        seen.append(line.strip())
        if line.startswith("wrote captions") and line.strip().endswith("shard-00004"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert "images manifest written" in seen and process.returncode == -signal.SIGKILL, seen[-3:]
    assert list_versions(local_root, "images") == ["v0001", "v0002"]  # the new images are complete...
    assert list_versions(local_root, "captions") == ["v0001"]  # ...their captions are not
    assert list_releases(local_root) == ["r0001"] and latest_release(local_root) == before["release"]
    served = resolve_release(local_root)
    assert served["images"]["version"] == served["captions"]["version"] == "v0001"  # never new images, old captions
    assert verify_release(local_root).ok
    assert load_index(local_root).ids([0]).tolist() == ["scene_00000"]
    # The next build skips the half-written number and publishes the next release.
    after = build_pair(local_root, seed=7)
    assert {c: e["version"] for c, e in after["collections"].items()} == {"images": "v0003", "captions": "v0003"}
    assert after["release"] == "r0002" and verify_release(local_root).ok


def test_shards_and_manifests_are_durable_before_the_release(local_root, monkeypatch):
    """Every file is fsynced (and its folder) before the release that names it is created."""
    import serving.storage as artifacts

    events = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst):
        events.append(("link", str(dst)))
        return real_link(src, dst)

    monkeypatch.setattr(artifacts.os, "fsync", fsync)
    monkeypatch.setattr(artifacts.os, "link", link)
    build_pair(local_root)
    release_at = next(i for i, (kind, path) in enumerate(events) if kind == "link" and path.endswith("r0001.json"))
    synced = {path for kind, path in events[:release_at] if kind == "fsync"}
    files = [p for p in Path(local_root.uri).rglob("*") if p.is_file() and "releases" not in p.parts]
    for path in files:  # each one under a temp name fsynced, then renamed or linked, then its folder fsynced
        assert str(path.parent) in synced, path
    assert sum(1 for path in synced if path.endswith(".partial")) >= len(files)
    assert sum(1 for kind, _ in events[release_at:] if kind == "fsync") >= 1  # the releases folder after the link
    assert not [p for p in Path(local_root.uri).rglob("*.partial")]


# --- image references ------------------------------------------------------------------------------


def test_added_items_keep_the_image_root_of_their_own_dataset(local_root):
    build_pair(local_root, n=10, image_root="/data/a")
    added = add_release(local_root, {
        "images": {"codes": random_codes(2, BITS, seed=3), "ids": ["images/new/x.jpg", "images/new/y.jpg"]},
        "captions": {"codes": random_codes(2, BITS, seed=4), "ids": ["images/new/x.jpg#0", "images/new/y.jpg#0"],
                     "image_ids": ["images/new/x.jpg", "images/new/y.jpg"], "texts": ["a", "b"]}},
        image_root="/data/b")
    images, captions = added["images"], added["captions"]
    assert images["image_roots"] == [{"root": "/data/a", "rows": [0, 9]}, {"root": "/data/b", "rows": [10, 11]}]
    refs = ImageRefs(images)
    assert refs(3, "scene_00003") == "/data/a/scene_00003"
    assert refs(10, "images/new/x.jpg") == "/data/b/images/new/x.jpg"
    caption_refs = ImageRefs(captions)  # caption rows: 20 from the build, then the 2 added
    assert caption_refs(21, "images/new/y.jpg") == "/data/b/images/new/y.jpg"
    assert caption_refs(0, "scene_00000") == "/data/a/scene_00000"
    assert ImageRefs(images, base="http://cdn/x")(10, "images/new/x.jpg") == "http://cdn/x/images/new/x.jpg"
    legacy = {**images, "extra": {"image_root": "/old"}, "next_row": 12}
    del legacy["image_roots"]
    assert ImageRefs(legacy)(11, "b.jpg") == "/old/b.jpg"  # manifests from before image_roots


def test_verify_release_reports_a_bad_shard_of_either_collection(local_root):
    build_pair(local_root)
    victim = Path(local_root.uri) / "index" / "captions" / "v0001" / "shard-00002.codes.npy"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_release(local_root)
    assert not report.ok and report.collections["images"].ok and not report.collections["captions"].ok
    assert "shard-00002" in str(report) and "checksum mismatch" in str(report)
    assert verify_release(local_root, collections=["images"]).ok

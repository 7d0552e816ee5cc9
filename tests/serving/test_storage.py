"""The artifact root contract, on a local folder and on an S3 endpoint served on loopback (moto)."""
from __future__ import annotations

import json

import pytest

from serving.storage import MANIFEST, ArtifactError, LocalRoot, S3Root, open_root


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return LocalRoot(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Root(f"s3://terrahash-test/{tmp_path.name}", endpoint_url=endpoint)


def make_tree(folder):
    (folder / "sub").mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(bytes(range(256)) * 100)
    (folder / "sub" / "config.yaml").write_text("train:\n  bits: 64\n")
    return folder


def test_bytes_round_trip_and_listing(root):
    root.write_bytes("runs/a/metrics.json", b'{"x": 1}')
    root.write_bytes("runs/b/metrics.json", b"{}")
    assert root.read_bytes("runs/a/metrics.json") == b'{"x": 1}'
    assert root.list("runs/") == ["runs/a/metrics.json", "runs/b/metrics.json"]
    assert root.exists("runs/a/metrics.json") and not root.exists("runs/c/metrics.json")


def test_dir_round_trip_is_verified(root, tmp_path):
    source = make_tree(tmp_path / "src")
    manifest = root.put_dir(source, "ckpt/epoch-3")
    assert set(manifest["files"]) == {"checkpoint.pt", "sub/config.yaml"}
    assert root.exists(f"ckpt/epoch-3/{MANIFEST}")
    out = root.get_dir("ckpt/epoch-3", tmp_path / "dst")
    for rel in manifest["files"]:
        assert (out / rel).read_bytes() == (source / rel).read_bytes()


def test_corrupted_file_is_refused_with_its_name(root, tmp_path):
    root.put_dir(make_tree(tmp_path / "src"), "ckpt/epoch-1")
    root.write_bytes("ckpt/epoch-1/checkpoint.pt", b"tampered")
    with pytest.raises(ArtifactError, match="checkpoint.pt: sha256 .* does not match"):
        root.get_dir("ckpt/epoch-1", tmp_path / "dst")


def test_folder_without_manifest_is_refused(root, tmp_path):
    root.write_bytes("ckpt/partial/checkpoint.pt", b"half")
    with pytest.raises(ArtifactError, match="no MANIFEST.json"):
        root.get_dir("ckpt/partial", tmp_path / "dst")


def test_manifest_naming_a_missing_file_is_refused(root, tmp_path):
    manifest = {"files": {"gone.bin": {"sha256": "0" * 64, "bytes": 1}}}
    root.write_bytes(f"ckpt/x/{MANIFEST}", json.dumps(manifest).encode())
    with pytest.raises(ArtifactError, match="gone.bin"):
        root.get_dir("ckpt/x", tmp_path / "dst")


def test_open_root_dispatches_on_the_uri(tmp_path, s3_endpoint):
    assert isinstance(open_root(tmp_path), LocalRoot)
    assert isinstance(open_root("s3://terrahash-test/p", endpoint_url=s3_endpoint), S3Root)
    with pytest.raises(ValueError, match="unsupported"):
        open_root("gs://bucket/x")


def test_local_keys_cannot_escape_the_root(tmp_path):
    with pytest.raises(ValueError, match="escapes"):
        LocalRoot(tmp_path / "root").write_bytes("../outside.txt", b"x")


def test_create_bytes_is_exclusive(root):
    root.create_bytes("index/releases/r0001.json", b"first")
    with pytest.raises(FileExistsError, match="r0001.json"):
        root.create_bytes("index/releases/r0001.json", b"second")
    assert root.read_bytes("index/releases/r0001.json") == b"first"
    root.write_bytes("plain.txt", b"a")
    with pytest.raises(FileExistsError):
        root.create_bytes("plain.txt", b"b")
    assert root.list("index/") == ["index/releases/r0001.json"]


def _race(folder, name, ready, results):
    """One of several processes creating the same key at once."""
    root = LocalRoot(folder)
    ready.wait()
    try:
        root.create_bytes("claims/v0001", name.encode())
        results.put(name)
    except FileExistsError:
        results.put(None)


def test_only_one_of_many_processes_creates_a_key(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, results = context.Event(), context.Queue()
    workers = [context.Process(target=_race, args=(tmp_path / "root", f"w{i}", ready, results)) for i in range(4)]
    for worker in workers:
        worker.start()
    ready.set()
    outcomes = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    winners = [o for o in outcomes if o]
    assert len(winners) == 1
    assert LocalRoot(tmp_path / "root").read_bytes("claims/v0001") == winners[0].encode()
    assert not [p for p in (tmp_path / "root").rglob("*") if p.name.endswith(".partial")]  # no temp left


def test_local_writes_use_their_own_temp_names(tmp_path, monkeypatch):
    """Two writers of one key never share a temp file (each is named for its writer)."""
    import os as os_module

    seen = []
    real_replace = os_module.replace

    def spy(src, dst):
        seen.append(os_module.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr("serving.storage.os.replace", spy)
    root = LocalRoot(tmp_path / "root")
    root.write_bytes("a/b.json", b"1")
    root.write_bytes("a/b.json", b"2")
    assert len(set(seen)) == 2 and all(name.startswith(".b.json.") and name.endswith(".partial") for name in seen)
    assert root.read_bytes("a/b.json") == b"2"


def test_a_job_output_on_s3_is_published_only_when_the_job_succeeds(s3_endpoint, monkeypatch, tmp_path):
    from serving.storage import ArtifactError, fetch_folder, output_folder

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    with pytest.raises(RuntimeError, match="boom"):
        with output_folder("s3://terrahash-test/jobs/failed") as folder:
            (folder / "checkpoint.pt").write_bytes(b"half")
            raise RuntimeError("boom")
    assert open_root("s3://terrahash-test/jobs").list("failed") == []  # nothing half-published
    with pytest.raises(ArtifactError, match="no MANIFEST"):
        fetch_folder("s3://terrahash-test/jobs/failed")

    with output_folder("s3://terrahash-test/jobs/run1") as folder:
        assert folder.is_dir() and "s3:" not in str(folder)
        (folder / "checkpoint.pt").write_bytes(b"weights")
        (folder / "onnx").mkdir()
        (folder / "onnx" / "image.json").write_text("{}")
    assert not folder.exists()  # the staging folder is gone
    cache = tmp_path / "cache"
    first = fetch_folder("s3://terrahash-test/jobs/run1", cache)
    assert first.name == "run1" and (first / "checkpoint.pt").read_bytes() == b"weights"
    assert (first / "onnx" / "image.json").read_text() == "{}"
    assert fetch_folder("s3://terrahash-test/jobs/run1", cache) == first  # reused, not fetched again
    inner = fetch_folder("s3://terrahash-test/jobs/run1/onnx", cache)  # a folder inside a published one
    assert inner.name == "onnx" and [p.name for p in inner.iterdir() if p.name != MANIFEST] == ["image.json"]
    with pytest.raises(ArtifactError, match="lists nothing under"):
        fetch_folder("s3://terrahash-test/jobs/run1/missing")
    open_root("s3://terrahash-test/jobs").put_dir(first, "copy")  # a fetched copy published again
    again = fetch_folder("s3://terrahash-test/jobs/copy", cache)
    assert (again / "checkpoint.pt").read_bytes() == b"weights"

    with output_folder("s3://terrahash-test/jobs/run1") as folder:  # the job writes it again
        (folder / "checkpoint.pt").write_bytes(b"better weights")
    second = fetch_folder("s3://terrahash-test/jobs/run1", cache)
    assert second != first and (second / "checkpoint.pt").read_bytes() == b"better weights"
    with pytest.raises(ValueError, match="under a bucket"):
        with output_folder("s3://terrahash-test"):
            pass

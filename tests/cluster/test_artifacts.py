"""The artifact root contract, on a local folder and on an S3 endpoint served on loopback (moto)."""
from __future__ import annotations

import json

import pytest

from cluster.artifacts import MANIFEST, ArtifactError, LocalRoot, S3Root, open_root


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

"""Shard files encrypted at rest (serving/index/crypto.py), and S3 server-side encryption passed through."""
from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pytest

from serving.model.codes import random_codes
from serving.index.crypto import KEY_ENV, KEY_FILE_ENV, Cipher, IndexKeyError, load_key, new_key, write_key_file
from serving.index.files import ShardIntegrityError
from serving.index.releases import load_index
from serving.index.versions import add_to_index, build_index, load_shard, read_manifest, verify_index

BITS = 64


@pytest.fixture
def plain_and_encrypted(tmp_path, monkeypatch):
    """The same 300 codes as a plain and an encrypted 3-shard index, and the key's file."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    key_file = tmp_path / "keys" / "index.key"
    key_file.parent.mkdir()
    write_key_file(key_file)
    codes = random_codes(300, BITS, seed=3)
    ids = [f"img-{i:04d}" for i in range(300)]
    plain = build_index(codes, ids, BITS, 3, tmp_path / "plain", model_version="m1")
    encrypted = build_index(codes, ids, BITS, 3, tmp_path / "encrypted", model_version="m1",
                            cipher=Cipher(load_key(key_file)))
    return {"plain": tmp_path / "plain", "encrypted": tmp_path / "encrypted", "key_file": key_file, "codes": codes,
            "manifest": encrypted, "tmp": tmp_path}


def test_an_encrypted_index_answers_as_the_plain_one(plain_and_encrypted):
    p = plain_and_encrypted
    manifest = p["manifest"]
    assert manifest["encryption"]["algorithm"] == "AES-256-GCM" and len(manifest["encryption"]["key_id"]) == 16
    assert "encryption" not in read_manifest(p["plain"], "v0001")
    for entry in manifest["shards"]:
        for info in entry["files"].values():
            stored = (p["encrypted"] / "index" / "images" / info["path"]).read_bytes()
            assert b"NUMPY" not in stored and b"img-0" not in stored  # neither the array header nor any id
            assert hashlib.sha256(stored).hexdigest() == info["sha256"]  # the checksums cover the ciphertext
    queries = random_codes(20, BITS, seed=9)
    want = load_index(p["plain"]).search(queries, 10)
    got = load_index(p["encrypted"], key_file=p["key_file"]).search(queries, 10)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    assert verify_index(p["encrypted"], "v0001", key_file=p["key_file"]).ok


def test_no_key_or_a_wrong_key_is_refused_clearly(plain_and_encrypted, monkeypatch):
    p = plain_and_encrypted
    with pytest.raises(ShardIntegrityError, match=r"is encrypted .*TERRAHASH_INDEX_KEY"):
        load_shard(p["encrypted"], "v0001", "shard-00000")
    monkeypatch.setenv(KEY_ENV, new_key())
    with pytest.raises(ShardIntegrityError, match="wrong key, nothing decrypted"):
        load_shard(p["encrypted"], "v0001", "shard-00000")
    report = verify_index(p["encrypted"], "v0001")
    assert not report.ok and "wrong key" in str(report)
    monkeypatch.setenv(KEY_ENV, "not a key")
    with pytest.raises(IndexKeyError, match="not an index key"):
        load_key()


def test_a_file_moved_to_another_shard_does_not_decrypt(plain_and_encrypted):
    """The file's path is authenticated with it: swapping two shards' files (checksums fixed up) fails."""
    p = plain_and_encrypted
    folder = p["encrypted"] / "index" / "images" / "v0001"
    first, second = folder / "shard-00000.codes.npy", folder / "shard-00001.codes.npy"
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b), second.write_bytes(a)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"][:2]:
        info = entry["files"]["codes"]
        info["sha256"] = hashlib.sha256((folder.parent / info["path"]).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardIntegrityError, match="does not decrypt"):
        load_shard(p["encrypted"], "v0001", "shard-00000", key_file=p["key_file"])


def test_added_items_stay_encrypted_and_the_key_is_kept_away_from_the_index(plain_and_encrypted, tmp_path):
    from serving.ingest.build import _cipher

    p = plain_and_encrypted
    added = add_to_index(p["encrypted"], "v0001", random_codes(30, BITS, seed=4), [f"new-{i}" for i in range(30)],
                         key_file=p["key_file"])
    assert added["encryption"] == p["manifest"]["encryption"]
    assert load_index(p["encrypted"], "v0002", key_file=p["key_file"]).manifest["rows"] == 330
    with pytest.raises(IndexKeyError, match="is encrypted"):
        add_to_index(p["encrypted"], "v0002", random_codes(1, BITS, seed=5), ["x"])  # no key: nothing written
    inside = p["encrypted"] / "index.key"
    write_key_file(inside)
    with pytest.raises(IndexKeyError, match="inside the index root"):
        _cipher(str(p["encrypted"]), str(inside))
    with pytest.raises(FileExistsError):
        write_key_file(inside)  # never overwrites a key


def test_cli_keygen_build_and_verify(plain_and_encrypted, capsys, monkeypatch):
    from cluster.cli.main import main

    p = plain_and_encrypted
    key = p["tmp"] / "keys" / "second.key"
    assert main(["index", "keygen", str(key)]) == 0 and "key id" in capsys.readouterr().out
    assert oct(key.stat().st_mode)[-3:] == "600"
    assert main(["index", "verify", str(p["encrypted"]), "--version", "v0001", "--collections", "images",
                 "--key-file", str(p["key_file"])]) == 0
    assert main(["index", "verify", str(p["encrypted"]), "--version", "v0001", "--collections", "images",
                 "--key-file", str(key)]) == 1
    assert "wrong key" in capsys.readouterr().out


def test_s3_objects_are_written_with_the_server_side_encryption_asked_for(s3_endpoint, monkeypatch, tmp_path):
    import boto3

    from serving.storage import SSE_ENV, SSE_KMS_KEY_ENV, open_root, sse_options

    prefix = f"sse-{uuid.uuid4().hex}"
    monkeypatch.setenv(SSE_ENV, "AES256")
    root = open_root(f"s3://terrahash-test/{prefix}", endpoint_url=s3_endpoint)
    root.write_bytes("a", b"1")
    root.create_bytes("b", b"2")
    (tmp_path / "c").write_bytes(b"3")
    root.upload(tmp_path / "c", "c")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in "abc":
        assert client.head_object(Bucket="terrahash-test", Key=f"{prefix}/{key}")["ServerSideEncryption"] == "AES256"
    monkeypatch.setenv(SSE_ENV, "aws:kms")
    monkeypatch.setenv(SSE_KMS_KEY_ENV, "alias/terrahash-index")
    open_root(f"s3://terrahash-test/{prefix}", endpoint_url=s3_endpoint).write_bytes("d", b"4")
    head = client.head_object(Bucket="terrahash-test", Key=f"{prefix}/d")
    assert (head["ServerSideEncryption"], head.get("SSEKMSKeyId")) == ("aws:kms", "alias/terrahash-index")
    monkeypatch.delenv(SSE_ENV)
    assert sse_options("aws:kms", "alias/terrahash") == {"ServerSideEncryption": "aws:kms",
                                                         "SSEKMSKeyId": "alias/terrahash"}
    with pytest.raises(ValueError, match="one of"):
        sse_options("DES")
    monkeypatch.setenv(SSE_KMS_KEY_ENV, "alias/x")
    with pytest.raises(ValueError, match="needs"):
        sse_options()

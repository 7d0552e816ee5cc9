"""The feature cache and the feature noise: keyed by image content, scaled on train images only."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import tiny_config
from training.batches import CachedBatches
from training.config import ImageTowerConfig, config_from_dict
from training.features import FeatureCache, image_features
from training.models import ImageEncoder


def test_an_image_replaced_in_place_gets_new_features(ucm_dir, tmp_path):
    sources = sorted(p for p in (ucm_dir / "images").rglob("*") if p.is_file())[:3]
    assert len(sources) == 3
    paths = [tmp_path / f"scene{i}{source.suffix}" for i, source in enumerate(sources)]
    for source, path in zip(sources, paths):
        shutil.copyfile(source, path)
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights="none", image_size=64))
    cache = FeatureCache(tmp_path / "cache")

    def features():
        return image_features(encoder, paths, 64, (0.5,) * 3, (0.5,) * 3, views=(0, 5), cache=cache)

    before = features()  # (V, 3, D), now cached
    assert np.array_equal(features(), before)  # same files: served from the cache
    shutil.copyfile(sources[2], paths[0])  # new bytes, same path
    after = features()
    assert not np.allclose(after[:, 0], before[:, 0])
    np.testing.assert_allclose(after[:, 0], before[:, 2], rtol=1e-5, atol=1e-6)  # the new image's features
    np.testing.assert_array_equal(after[:, 1:], before[:, 1:])
    uncached = image_features(encoder, paths, 64, (0.5,) * 3, (0.5,) * 3, views=(0, 5))
    np.testing.assert_allclose(after, uncached, rtol=1e-5, atol=1e-6)


def test_feature_noise_is_scaled_by_the_spread_of_the_train_rows_only():
    torch.manual_seed(0)
    features = torch.randn(2, 10, 4)  # (V, N, D)
    features[:, 6:] *= 100  # val and test images spread far wider
    train = np.arange(6)
    batches = CachedBatches(features, train[::2], np.zeros(10), [np.array([i]) for i in range(10)], 4, 0.5, 0,
                            noise_rows=train)
    expected = 0.5 * features[0, :6].std(dim=0, keepdim=True)  # (1, D)
    torch.testing.assert_close(batches.noise_scale, expected)


def test_training_noise_scale_ignores_val_and_test_images(subset, tiny_text_encoder, tmp_path):
    from serving.ingest.dataset import load_dataset
    from training.train import DatasetIndex, Trainer

    config = config_from_dict(tiny_config(tiny_text_encoder))
    index = DatasetIndex.build(load_dataset(subset))
    trainer = Trainer(config, index, torch.device("cpu"), FeatureCache(tmp_path / "cache"))
    train = index.rows("train")
    batches = trainer.batches(train[::2], seed=0)  # a worker's shard: the scale is still the split's
    features = torch.as_tensor(trainer.encoders.image_features(config.train.views))  # (V, N, D)
    expected = config.train.feature_noise * features[0, torch.as_tensor(train)].std(dim=0, keepdim=True)
    torch.testing.assert_close(batches.noise_scale, expected)
    everything = config.train.feature_noise * features[0].std(dim=0, keepdim=True)
    assert not torch.allclose(batches.noise_scale, everything)


def test_sensor_views_are_the_same_per_view_and_row_and_show_no_fill(ucm_dir):
    """A sensor view is drawn from (view, row) alone; it is rotated off-axis and cropped so no
    fill colour shows in its corners."""
    from training.features import load_image, sensor_view

    image = torch.from_numpy(load_image(ucm_dir / "images" / "airplane" / "airplane00.jpg", 64)).permute(2, 0, 1)
    first = sensor_view(image, 0, 3)
    assert first.shape == image.shape and first.dtype == torch.uint8
    assert torch.equal(first, sensor_view(image, 0, 3))
    assert not torch.equal(first, sensor_view(image, 1, 3)) and not torch.equal(first, sensor_view(image, 0, 4))
    assert not torch.equal(first, image)
    for view in range(6):
        out = sensor_view(image, view, 0)
        corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (3, 4)
        assert (corners.sum(dim=0) > 0).all(), f"view {view} shows fill in a corner"


def test_onnxruntime_features_match_torch_and_export_once(ucm_dir, tmp_path, monkeypatch):
    """A large set on a CPU runs through onnxruntime (training/onnx_features.py): the same features as torch
    to 1e-4, the encoder exported once into the cache and checked against torch each time it loads."""
    from training import onnx_features

    paths = sorted(p for p in (ucm_dir / "images").rglob("*") if p.is_file())[:6]
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageTowerConfig(backbone="test_efficientnet", weights="none", image_size=64,
                                            pool_levels=(1,)))
    args = (encoder, paths, 64, (0.5,) * 3, (0.5,) * 3)
    monkeypatch.setenv("TERRAHASH_FEATURES", "torch")
    want = image_features(*args, views=(0, 5, 1), sensor_views=1)
    monkeypatch.setenv("TERRAHASH_FEATURES", "onnxruntime")
    cache = FeatureCache(tmp_path / "cache")
    got = image_features(*args, views=(0, 5, 1), sensor_views=1, cache=cache)
    np.testing.assert_allclose(got, want, atol=onnx_features.VERIFY_ATOL)
    exported = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(exported) == 1 and "levels1-64px" in exported[0].name
    stamp = exported[0].stat().st_mtime_ns
    again = image_features(*args, views=(2,), cache=cache)  # a view not cached yet: the export is reused
    assert exported[0].stat().st_mtime_ns == stamp and again.shape == (1, 6, got.shape[2])
    monkeypatch.setenv("TERRAHASH_FEATURES", "auto")
    assert onnx_features.wanted(torch.device("cpu"), onnx_features.MIN_IMAGES)
    assert not onnx_features.wanted(torch.device("cpu"), 10) and not onnx_features.wanted(torch.device("cuda"), 10 ** 6)
    monkeypatch.setenv("TERRAHASH_FEATURES", "fast")
    with pytest.raises(ValueError, match="TERRAHASH_FEATURES"):
        onnx_features.wanted(torch.device("cpu"), 10)
    with torch.no_grad():  # other weights under the old file's name are refused, not silently used
        next(encoder.parameters()).add_(1.0)
    fingerprint = exported[0].name.split("-")[0]
    with pytest.raises(RuntimeError, match="differ from torch"):
        onnx_features.OnnxFeatures(encoder, fingerprint, 64, tmp_path / "cache")
    again = onnx_features.load(encoder, fingerprint, 64, tmp_path / "cache")  # the stale file exported again
    assert isinstance(again, onnx_features.OnnxFeatures) and again.error <= onnx_features.VERIFY_ATOL
    exported[0].write_bytes(b"not onnx")
    assert isinstance(onnx_features.load(encoder, fingerprint, 64, tmp_path / "cache"), onnx_features.OnnxFeatures)

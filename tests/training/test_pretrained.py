"""The packaged EfficientNet-Lite weights map onto timm exactly."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from training.pretrained import IMAGE_WEIGHTS, load_packaged_image_weights, map_efficientnet_lite_state_dict

efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")


@pytest.mark.parametrize("architecture,reference,size", [
    ("tf_efficientnet_lite0", "efficientnet-lite0", 224),
    ("tf_efficientnet_lite1", "efficientnet-lite1", 240),
])
def test_mapped_weights_give_reference_imagenet_logits(ucm_dir, architecture, reference, size):
    ours = timm.create_model(architecture, pretrained=False)
    load_packaged_image_weights(ours, architecture)
    theirs = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        reference, weights_path=str(IMAGE_WEIGHTS[architecture].path()))
    image = Image.open(ucm_dir / "images" / "airplane" / "airplane00.jpg").convert("RGB")
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        a, b = ours.eval()(x[None]), theirs.eval()(x[None])
    assert a.shape == (1, 1000)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The weights are real ImageNet weights: confident, not a uniform random-init output.
    assert a.softmax(-1).max() > 0.05


def test_mapping_is_by_name_and_checked():
    source = torch.load(IMAGE_WEIGHTS["tf_efficientnet_lite0"].path(), map_location="cpu", weights_only=True)
    lite1 = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(ValueError, match="not covered"):
        map_efficientnet_lite_state_dict(source, lite1)  # lite0 has fewer blocks than lite1


def test_headless_model_drops_the_classifier_and_keeps_every_backbone_tensor():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    source = torch.load(IMAGE_WEIGHTS["tf_efficientnet_lite0"].path(), map_location="cpu", weights_only=True)
    mapped = map_efficientnet_lite_state_dict(source, model)
    assert set(mapped) == set(model.state_dict())
    assert torch.equal(mapped["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.1.0.conv_pwl.weight"], source["_blocks.1._project_conv.weight"])


def test_unknown_architecture_names_the_packaged_ones():
    with pytest.raises(KeyError, match="tf_efficientnet_lite0"):
        load_packaged_image_weights(timm.create_model("test_efficientnet"), "test_efficientnet")

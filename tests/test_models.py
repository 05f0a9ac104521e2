"""The model registry and the CAM head."""

from __future__ import annotations

import pytest
import torch

from diagnostics.models.cxr import CAMClassifier, WithCAM, adapt_first_conv
from diagnostics.models.registry import create_model, list_models, register_model

ALL = [
    "compact_cnn",
    "densenet121",
    "efficientnet_b0",
    "monai_densenet121",
    "resnet18",
    "resnet50",
    "tiny_cnn",
]


def test_registry_lists_the_networks():
    assert set(ALL) <= set(list_models())


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError) as err:
        create_model("vgg11")
    assert "vgg11" in str(err.value) and "resnet18" in str(err.value)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kw: None)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [1, 3])
def test_each_network_gives_logits_and_cam(name, channels):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=3).eval()
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        logits, cam = model.forward_cam(x)
        plain = model(x)
    assert logits.shape == (2, 3) and cam.ndim == 4 and cam.shape[:2] == (2, 3)
    # logits are the spatial mean of the CAM: the heatmap explains the score exactly
    torch.testing.assert_close(logits, cam.mean(dim=(2, 3)))
    torch.testing.assert_close(plain, logits)


def test_cam_equals_linear_head_on_pooled_features():
    model = create_model("tiny_cnn", num_classes=2).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        pooled = feats.mean(dim=(2, 3))
        w = model.head.weight[:, :, 0, 0]
        expected = pooled @ w.T + model.head.bias
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_first_conv_adaptation_sums_rgb_weights():
    conv = torch.nn.Conv2d(3, 4, 3, bias=False)
    one = adapt_first_conv(conv, 1)
    assert one.in_channels == 1
    torch.testing.assert_close(one.weight, conv.weight.sum(dim=1, keepdim=True))
    # A grey image repeated to RGB gives the same output through either conv.
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(one(x), conv(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def test_local_weights_load_through_the_real_code_path(tmp_path):
    # The ImageNet path downloads; the same loader takes a local state dict, as offline sites need.
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    torch.nn.init.constant_(reference.conv1.weight, 0.01)
    path = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), path)
    model = create_model("resnet18", in_channels=3, num_classes=2, weights_path=path)
    torch.testing.assert_close(model.features[0].weight, reference.conv1.weight)
    grey = create_model("resnet18", in_channels=1, num_classes=2, weights_path=path)
    torch.testing.assert_close(grey.features[0].weight, reference.conv1.weight.sum(1, keepdim=True))


def test_export_wrapper_returns_logits_cam_and_embedding():
    model = create_model("tiny_cnn", num_classes=2, width=4, blocks=2).eval()
    x = torch.randn(3, 1, 32, 32)
    logits, cam, embedding = WithCAM(model)(x)
    assert isinstance(model, CAMClassifier)
    assert logits.shape == (3, 2) and cam.shape[:2] == (3, 2) and embedding.shape == (3, 8)
    torch.testing.assert_close(logits, model(x))
    # the embedding is the pooled feature map the head reads: head(embedding) == logits
    w, b = model.head.weight[:, :, 0, 0], model.head.bias
    torch.testing.assert_close(embedding @ w.T + b, logits, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        create_model("tiny_cnn", in_channels=2)
    with pytest.raises(ValueError):
        create_model("tiny_cnn", pretrained=True)
    with pytest.raises(ValueError):
        create_model("monai_densenet121", pretrained=True)


def test_population_head_in_training_and_in_the_export_wrapper():
    torch.manual_seed(0)
    model = create_model("compact_cnn", num_classes=2, width=8).add_population_head().eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        logits, population = model.forward_train(x)
        wrapped = WithCAM(model)
        outputs = wrapped(x)
    assert wrapped.output_names() == ["logits", "cam", "embedding", "population"]
    assert population.shape == (3,) and len(outputs) == 4
    torch.testing.assert_close(outputs[0], logits)
    torch.testing.assert_close(outputs[3], population)  # the head reads the pooled features
    torch.testing.assert_close(model.population(outputs[2]).squeeze(1), population)
    plain = create_model("compact_cnn", num_classes=2, width=8)
    assert WithCAM(plain).output_names() == ["logits", "cam", "embedding"]

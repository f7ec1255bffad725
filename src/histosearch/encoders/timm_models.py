"""Encoders built by timm: any timm architecture with a local checkpoint."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from histosearch.encoders.registry import Encoder, EncoderError, register_prefix


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .pth or .bin checkpoint (unwrapping `state_dict`/`model`)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise EncoderError(path, f"not a readable checkpoint: {error}") from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(path, "the checkpoint holds no tensor state dict")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load `state` into `model`, ignoring only a classifier head; name what does not fit."""
    model_keys = set(model.state_dict())
    state = {k: v for k, v in state.items() if k in model_keys}
    missing = sorted(model_keys - set(state))
    if missing:
        raise EncoderError(
            path,
            f"checkpoint does not fit {type(model).__name__}: {len(missing)} tensors missing, "
            f"e.g. {', '.join(missing[:3])}",
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise EncoderError(path, f"checkpoint does not fit: {error}") from error


def encoder_from_timm(name: str, model: torch.nn.Module) -> Encoder:
    """Wrap a timm model (classifier removed) with its own preprocessing."""
    config = timm.data.resolve_data_config({}, model=model)
    return Encoder(
        name=name,
        model=model,
        dim=model.num_features,
        input_size=config["input_size"][-1],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
    )


@register_prefix("timm")
def timm_encoder(arch: str, weights: Path | None) -> Encoder:
    """`timm:<arch>` from a local checkpoint, e.g. a pathology foundation model."""
    from histosearch.encoders.catalog import HUB_FILES, checkpoint_in_folder
    from histosearch.encoders.fingerprint import weights_fingerprint

    if weights is None:
        raise EncoderError(None, f"timm:{arch} needs a local checkpoint: pass --weights PATH")
    if weights.is_dir():
        found = checkpoint_in_folder(weights, HUB_FILES)
        if found is None or found.name.endswith(".json"):
            raise EncoderError(weights, f"no {' or '.join(HUB_FILES)} in this folder")
        weights = found
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as error:
        raise EncoderError(None, f"timm cannot build {arch!r}: {error}") from error
    load_into(model, load_state_dict(weights), weights)
    encoder = encoder_from_timm(f"timm:{arch}", model)
    encoder.fingerprint = weights_fingerprint([weights])
    return encoder

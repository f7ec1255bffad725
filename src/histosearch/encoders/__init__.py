"""Encoders: `create_encoder("efficientnet-lite0-imagenet")`, `@register("name")` for more."""

from histosearch.encoders import handcrafted, imagenet  # noqa: F401  (registers the built-ins)
from histosearch.encoders.registry import (
    Encoder,
    EncoderError,
    available_encoders,
    create_encoder,
    register,
)

__all__ = ["Encoder", "EncoderError", "available_encoders", "create_encoder", "register"]

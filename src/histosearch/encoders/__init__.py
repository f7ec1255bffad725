"""Encoders: `create_encoder("efficientnet-lite0-imagenet")`, `@register("name")` for more.

The names resolve lazily, so `histosearch.encoders.catalog` (no torch) imports fast."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histosearch.encoders.registry import (
        Encoder,
        EncoderError,
        available_encoders,
        create_encoder,
        register,
    )

__all__ = ["Encoder", "EncoderError", "available_encoders", "create_encoder", "register"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from histosearch.encoders import registry

        return getattr(registry, name)
    raise AttributeError(name)

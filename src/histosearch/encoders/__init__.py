"""Encoders: `create_encoder("efficientnet-lite0-imagenet")`, `@register_encoder("name")` for
more (in a module named in the `histosearch.encoders` entry points), `list_encoders()`.

The names resolve lazily, so `histosearch.encoders.catalog` (no torch) imports fast."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histosearch.encoders.registry import (
        Encoder,
        EncoderError,
        available_encoders,
        create_encoder,
        get_encoder_factory,
        is_encoder,
        list_encoders,
        list_prefixes,
        register,
        register_encoder,
        register_file_loader,
        register_prefix,
    )

__all__ = [
    "Encoder",
    "EncoderError",
    "available_encoders",
    "create_encoder",
    "get_encoder_factory",
    "is_encoder",
    "list_encoders",
    "list_prefixes",
    "register",
    "register_encoder",
    "register_file_loader",
    "register_prefix",
]


def __getattr__(name: str) -> object:
    if name in __all__:
        from histosearch.encoders import registry

        return getattr(registry, name)
    raise AttributeError(name)

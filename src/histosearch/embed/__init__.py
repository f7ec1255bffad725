"""Embedding: tiles and images in batches (`batches`), one file or archive item the way an
archive embeds it (`items`, with `options`), and the same spread over Ray actors
(`distributed`). Names resolve lazily, so that `EmbedOptions` comes without torch."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from histosearch.embed.batches import (
        ImageDataset,
        TileDataset,
        default_device,
        embed_dataset,
        is_patch_file,
    )
    from histosearch.embed.items import EmbeddedFile, embed_file, embed_item, is_patch_item
    from histosearch.embed.options import EmbedOptions

_WHERE = {
    "ImageDataset": "batches",
    "TileDataset": "batches",
    "default_device": "batches",
    "embed_dataset": "batches",
    "is_patch_file": "batches",
    "EmbeddedFile": "items",
    "embed_file": "items",
    "embed_item": "items",
    "is_patch_item": "items",
    "EmbedOptions": "options",
}
__all__ = [
    "EmbedOptions",
    "EmbeddedFile",
    "ImageDataset",
    "TileDataset",
    "default_device",
    "embed_dataset",
    "embed_file",
    "embed_item",
    "is_patch_file",
    "is_patch_item",
]


def __getattr__(name: str) -> object:
    if name in _WHERE:
        return getattr(import_module(f"histosearch.embed.{_WHERE[name]}"), name)
    raise AttributeError(name)

"""Extraction on Ray: items spread over actors that each hold one encoder; the driver gets
every result (or failure) as it arrives and commits the catalog rows itself.

Workers read the slides from their paths (a shared filesystem on a cluster) and return the
features in float16, as the archive stores them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from histosearch.embed.items import EmbeddedFile, embed_item
from histosearch.embed.options import DEFAULT_OPTIONS, EmbedOptions
from histosearch.errors import HistosearchError
from histosearch.inputs import Item
from histosearch.tiling import Tiling

# How long a Ray address may take to accept a connection before it counts as unreachable.
CONNECT_TIMEOUT_S = 5.0
# Object store of a local instance: results are a few MB each, and the machine is shared.
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20


class RayError(HistosearchError):
    """Ray is missing, or the cluster cannot be reached."""


class EmbeddingWorker:
    """One encoder, on the worker's GPU when Ray gave it one; embeds one item per call."""

    def __init__(self, encoder_name: str, weights: str | None) -> None:
        from histosearch.embed.batches import default_device
        from histosearch.encoders import create_encoder

        self.encoder = create_encoder(encoder_name, weights).to(default_device())

    def embed(self, item: Item, tiling: Tiling, options: EmbedOptions) -> EmbeddedFile | str:
        """The item's embeddings (float16, as the archive stores them), or a one-line failure
        naming its file."""
        try:
            embedded = embed_item(item, self.encoder, tiling, replace(options, num_workers=0))
            return replace(embedded, features=embedded.features.astype(np.float16))
        except HistosearchError as error:
            return str(error)
        except Exception as error:  # one bad slide must not stop a batch
            return f"{item.paths[0]}: unexpected {type(error).__name__}: {error}"


def _host_port(address: str) -> tuple[str, int] | None:
    """The host and port of `ray://host:port` or `host:port`; None for `auto` and the like."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None


def connect_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start a local Ray instance or connect to `address`; True when this call started Ray."""
    try:
        import ray
    except ImportError:
        raise RayError(None, "Ray is not installed (pip install 'histosearch[ray]')") from None
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=False,
        )
        return True
    target = _host_port(address)
    if target is not None:
        try:
            socket.create_connection(target, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as error:
            raise RayError(address, f"cannot reach the Ray cluster: {error}") from None
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError, ValueError...
        raise RayError(address, f"cannot connect to the Ray cluster: {error}") from None
    return True


def embed_items_on_ray(
    items: Iterable[Item],
    encoder_name: str,
    weights: str | Path | None,
    tiling: Tiling,
    options: EmbedOptions = DEFAULT_OPTIONS,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    on_result: Callable[[Item, EmbeddedFile], None],
    on_failure: Callable[[Item, str], None],
) -> None:
    """Embed `items` on Ray actors (one encoder each: one per GPU when the cluster has GPUs,
    else one per CPU, or `num_workers`); `on_result(item, embedded)` or
    `on_failure(item, message)` runs here, in the driver, as each item finishes.

    Without `address` a local Ray instance is started (and stopped at the end); an address
    that does not answer within seconds raises RayError."""
    items = list(items)
    if not items:
        return
    started = connect_ray(address, num_workers)
    import ray

    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = min(len(items), num_workers or gpus or max(1, cpus))
        actor = ray.remote(num_cpus=0 if gpus else 1, num_gpus=1 if gpus else 0)(EmbeddingWorker)
        weights_arg = None if weights is None else str(weights)

        def start() -> object:
            return actor.remote(encoder_name, weights_arg)

        todo = list(reversed(items))
        running: dict[object, tuple[object, Item]] = {}

        def submit(worker: object) -> None:
            if todo:
                item = todo.pop()
                running[worker.embed.remote(item, tiling, options)] = (worker, item)

        for _ in range(count):
            submit(start())
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            worker, item = running.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayError as error:  # the worker died (out of memory, crash)
                outcome = f"{item.paths[0]}: the Ray worker failed: {type(error).__name__}"
                worker = start()
            if isinstance(outcome, str):
                on_failure(item, outcome)
            else:
                on_result(item, outcome)
            submit(worker)
    finally:
        if started:
            ray.shutdown()

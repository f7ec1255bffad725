"""`histosearch bench serve`: query latency and deep-zoom tile throughput of a running server.

The server is a real `histosearch serve` subprocess on a free 127.0.0.1 port, warmed up
before anything is timed; clients are threads with their own HTTP connection.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from histosearch.bench.common import MissingExtraError
from histosearch.errors import HistosearchError

try:
    import httpx
except ImportError:  # the `bench` extra (and `dev`) installs it
    raise MissingExtraError("httpx", "serve") from None


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_server(
    archive_dir: str | Path, *extra: str, startup_s: float = 180.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`histosearch serve` on a free local port until the block ends: (base URL, process)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "histosearch.cli", "serve", "--archive", str(archive_dir)]
    # The log goes to a file: a pipe nobody reads would block the server once full.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port), *extra], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield _wait_until_listening(process, port, log, startup_s), process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_listening(process: subprocess.Popen, port: int, log: IO[str], wait_s: float) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise HistosearchError(None, f"the server exited: {log.read()[-2000:]}")
        try:
            httpx.get(f"{url}/api/health", timeout=1.0)  # any answer: it is listening
            return url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise HistosearchError(None, f"the server did not start in {wait_s:g} s") from None
            time.sleep(0.25)


@dataclass(frozen=True)
class Latency:
    """Latencies of one kind of request at one concurrency."""

    name: str
    clients: int
    requests: int
    p50_ms: float
    p95_ms: float
    per_s: float


def measure(
    name: str, url: str, clients: int, jobs: list[Callable[[httpx.Client], httpx.Response]]
) -> Latency:
    """Run `jobs` spread over `clients` threads; every answer must be 200."""
    times: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    queue = list(jobs)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120.0) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    job = queue.pop()
                started = time.perf_counter()
                response = job(client)
                elapsed = time.perf_counter() - started
                with lock:
                    times.append(elapsed)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise HistosearchError(None, f"{name}: {len(failures)} requests failed: {failures[0]}")
    ms = np.array(times) * 1000
    return Latency(
        name,
        clients,
        len(times),
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 95)),
        len(times) / wall,
    )


def tile_addresses(url: str, slide_id: int) -> list[str]:
    """Every deep-zoom tile of a slide, all levels."""
    xml = httpx.get(f"{url}/slides/{slide_id}.dzi", timeout=30).text
    root = ElementTree.fromstring(xml)
    size = root.find("{*}Size")
    width, height = int(size.get("Width")), int(size.get("Height"))
    tile = int(root.get("TileSize"))
    levels = math.ceil(math.log2(max(width, height))) + 1
    paths = []
    for level in range(levels):
        scale = 2 ** (levels - 1 - level)
        cols = math.ceil(math.ceil(width / scale) / tile)
        rows = math.ceil(math.ceil(height / scale) / tile)
        paths += [
            f"/slides/{slide_id}_files/{level}/{c}_{r}.jpeg"
            for r in range(rows)
            for c in range(cols)
        ]
    return paths


def default_patch(data: Path) -> Path:
    """The patch image `bench serve` queries with by default: the first of LC25000's dev set."""
    from histosearch.inputs import read_manifest_rows

    lc = data / "lc25000-lung-dev"
    rows, _, _ = read_manifest_rows(lc / "manifest.csv")
    return lc / rows[0]["path"]


def bench_serve(
    archive_dir: str | Path,
    patch: Path,
    slide_id: int | None = None,
    queries: int = 40,
    concurrency: tuple[int, ...] = (1, 8),
) -> list[Latency]:
    """Latency of a patch query (an uploaded patch image), of a whole-slide query (an archived
    slide) and of deep-zoom tiles, on a warm server."""
    patch_bytes = patch.read_bytes()
    with running_server(archive_dir) as (url, _):
        slides = httpx.get(f"{url}/api/slides?limit=1000", timeout=30).json()["slides"]
        viewable = [s for s in slides if s["viewable"]]
        if slide_id is None:
            if not viewable:
                raise HistosearchError(archive_dir, "the archive has no viewable slide to time")
            slide_id = viewable[0]["id"]

        def patch_query(client: httpx.Client) -> httpx.Response:
            return client.post(
                "/api/search", files={"file": (patch.name, patch_bytes)}, data={"k": "5"}
            )

        def slide_query(client: httpx.Client) -> httpx.Response:
            return client.post("/api/search", json={"slide": slide_id, "k": 5, "mode": "slides"})

        def tile(path: str) -> Callable[[httpx.Client], httpx.Response]:
            return lambda client: client.get(path)

        tiles = tile_addresses(url, slide_id)
        # Warm-up: the encoder's first passes, the slide's handle, the OS file cache.
        measure("warm-up", url, 2, [patch_query, slide_query] * 3 + [tile(p) for p in tiles])
        results = []
        for clients in concurrency:
            results.append(measure("patch query", url, clients, [patch_query] * queries))
            results.append(measure("slide query", url, clients, [slide_query] * queries))
            results.append(measure("deep-zoom tile", url, clients, [tile(p) for p in tiles * 2]))
        return results

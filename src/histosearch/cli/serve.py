"""`histosearch serve` (the search service and its page) and `feedback` (export the marks)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from histosearch.cli.common import SearchRayAddress, console, error_console


def is_local_host(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; any non-loopback one needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="HISTOSEARCH_TOKEN",
            help="Bearer token every /api and /slides request must carry.",
        ),
    ] = None,
    max_upload_mb: Annotated[
        int, typer.Option("--max-upload-mb", min=1, help="Largest upload accepted.")
    ] = 512,
    ray_address: SearchRayAddress = None,
) -> None:
    """Serve the archive: the search API (docs at /docs) and the viewer page at /."""
    if not is_local_host(host) and not token:
        error_console.print(
            f"[red]error:[/red] refusing to listen on {host} without --token: anyone who can "
            "reach this machine could read every slide; give --token (or HISTOSEARCH_TOKEN), "
            "or bind 127.0.0.1",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    import uvicorn

    from histosearch.server.app import OPENSEADRAGON, create_app

    app = create_app(archive_dir, token=token, max_upload_mb=max_upload_mb, ray_address=ray_address)
    if not (OPENSEADRAGON / "openseadragon.min.js").is_file():
        error_console.print(
            "[yellow]warning:[/yellow] the page's viewer (OpenSeadragon) is not installed: "
            "run `bash dev.sh` or `npm ci` in src/histosearch/server/static; the API works",
            highlight=False,
            soft_wrap=True,
        )
    shown = f"[{host}]" if ":" in host else host
    console.print(
        f"histosearch: serving {archive_dir.resolve()} at http://{shown}:{port}/ "
        "(API docs at /docs)",
        highlight=False,
    )
    uvicorn.run(app, host=host, port=port, log_level="info")


def feedback(
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    csv_path: Annotated[Path, typer.Option("--csv", help="The CSV file to write.")],
) -> None:
    """Export the relevance marks given in the viewer as a CSV (ground truth for evaluation)."""
    from histosearch.archive.feedback import export_csv
    from histosearch.archive.shards import open_archive

    with open_archive(archive_dir) as archive:  # a sharded one keeps them in its first shard
        count = export_csv(archive.catalog, csv_path)
    console.print(f"{count} marks written to {csv_path}", highlight=False)

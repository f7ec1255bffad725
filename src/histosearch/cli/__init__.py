"""The `histosearch` command line: one module per command group, assembled here."""

from __future__ import annotations

import inspect
import os
import sys

import typer
from rich.markup import escape

from histosearch.cli.archive import annotate, check, demo, index, reindex, search
from histosearch.cli.bench import (
    bench_api_command,
    bench_extract_command,
    bench_mosaic_command,
    bench_resume_command,
    bench_scale_command,
    bench_scale_plot_command,
    bench_search_command,
    bench_serve_command,
    bench_shards_command,
    bench_tiling_command,
    bench_tissue_command,
)
from histosearch.cli.common import INTERRUPTED, error_console
from histosearch.cli.encoders import encoders_command
from histosearch.cli.evaluation import eval_command
from histosearch.cli.interchange import export
from histosearch.cli.serve import feedback, serve
from histosearch.cli.slides import tile
from histosearch.cli.training import explain, train, verify
from histosearch.errors import HistosearchError

app = typer.Typer(
    help="Content-based similarity search for histopathology slides and patches.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # click's plain help: typer's rich help imports markdown-it, pygments and attrs (150 ms,
    # half of `histosearch --help`)
    rich_markup_mode=None,
)
for command in (tile, index, search, annotate, check, reindex):
    app.command()(command)
app.command("eval")(eval_command)
app.command("encoders")(encoders_command)
for command in (train, verify, explain, demo):
    app.command()(command)
app.command()(export)
app.command()(serve)
app.command()(feedback)

bench_app = typer.Typer(
    help="Benchmarks whose figures the README reports.", no_args_is_help=True, rich_markup_mode=None
)
bench_app.command("tiling")(bench_tiling_command)
bench_app.command("search")(bench_search_command)
bench_app.command("extract")(bench_extract_command)
bench_app.command("tissue")(bench_tissue_command)
bench_app.command("mosaic")(bench_mosaic_command)
bench_app.command("resume")(bench_resume_command)
bench_app.command("api")(bench_api_command)
bench_app.command("scale")(bench_scale_command)
bench_app.command("scale-plot")(bench_scale_plot_command)
bench_app.command("serve")(bench_serve_command)
bench_app.command("shards")(bench_shards_command)
# A docstring's paragraphs as one line each: the command list shows no wrapped source lines.
for info in (*app.registered_commands, *bench_app.registered_commands):
    paragraphs = inspect.cleandoc(info.callback.__doc__ or "").split("\n\n")
    info.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)
app.add_typer(bench_app, name="bench")


def main() -> None:
    """Console entry point: a bad input ends with its one-line reason, not a traceback."""
    try:
        app()
    except HistosearchError as error:
        # the reason is plain text: brackets in it (a path, `histosearch[bench]`) are no markup
        error_console.print(
            f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True
        )
        raise SystemExit(error.exit_code) from None
    except SystemExit as stop:
        if stop.code == INTERRUPTED:  # the work is committed and closed, and the message out:
            sys.stdout.flush()  # skip the seconds torch's teardown takes, a Ctrl-C is a hurry
            sys.stderr.flush()
            os._exit(INTERRUPTED)
        raise

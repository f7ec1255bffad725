"""`histosearch bench`: the benchmarks whose figures the README reports."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from histosearch.cli.common import (
    DEFAULT_ENCODER,
    ENCODER_HELP,
    SHARED_DATA,
    console,
    error_console,
    progress,
    write_lc25000_subset,
)


def bench_tiling_command(
    slides: Annotated[
        list[Path] | None,
        typer.Argument(help="OpenSlide-readable slides (default: the SVS fixtures)."),
    ] = None,
    mag: Annotated[float, typer.Option("--mag", help="Magnification.")] = 20.0,
    size: Annotated[
        int, typer.Option("--size", help="Side of the written pyramidal TIFF.")
    ] = 16384,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
    dicomweb: Annotated[
        str | None,
        typer.Option(
            "--dicomweb",
            help="A dicomweb:// slide, tiled beside SLIDES (the same slide's files) instead.",
        ),
    ] = None,
) -> None:
    """Tiles/s of tiling with tissue filtering against raw OpenSlide read_region calls; with
    --dicomweb, of the DICOMweb slide beside SLIDES."""
    from histosearch.bench.tiling import bench_sources, bench_tiling_runs

    if dicomweb is not None:
        table = Table(title=f"Tiling from files and DICOMweb, 224 px at {mag:g}x (best of 3)")
        for column in ("source", "tissue tiles", "tiles/s (opening included)"):
            table.add_column(column, justify="left" if column == "source" else "right")
        for rate in bench_sources([*(slides or []), dicomweb], mag):
            table.add_row(rate.source, str(rate.tiles), f"{rate.tiles_per_s:.0f}")
        console.print(table)
        return

    table = Table(title=f"Tiling throughput, 224 px tiles at {mag:g}x (best of 3)")
    for column in (
        "slide",
        "mag",
        "tissue tiles",
        "raw read_region tiles/s",
        "histosearch tiles/s",
        "ratio",
    ):
        table.add_column(column, justify="left" if column == "slide" else "right")
    for result in bench_tiling_runs(slides or [], mag, data, size, error_console.print):
        table.add_row(
            result.slide,
            f"{result.magnification:g}x",
            str(result.tiles),
            f"{result.raw_tiles_per_s:.0f}",
            f"{result.histosearch_tiles_per_s:.0f}",
            f"{result.ratio:.2f}",
        )
    console.print(table)


def bench_search_command(
    mags: Annotated[
        list[float] | None, typer.Option("--mag", help="Magnifications (default all four).")
    ] = None,
    dims: Annotated[
        list[int] | None, typer.Option("--dim", help="Embedding sizes (default 2048 and 128).")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, or bfloat16 (~1e-3 off, faster).")
    ] = "float32",
) -> None:
    """The paper's Table I: leave-one-out slide search time at its scale (synthetic embeddings)."""
    from histosearch.bench.search import PAPER_PATCHES, bench_search, search_agreement

    deviation, same = search_agreement(dtype)
    console.print(
        f"small case (24 slides, 3000 patches, {dtype}): "
        f"max |blocked - pair by pair| = {deviation:.1e}, "
        f"top-5 rankings {'identical' if same else 'DIFFERENT'}",
        highlight=False,
    )
    table = Table(
        title=f"Leave-one-out search over 88 slides, this machine ({dtype}) vs the paper's CPU"
    )
    for column in (
        "mag",
        "dim",
        "patches",
        "this machine",
        "paper (10-core CPU)",
        "speed-up",
        "process peak RSS",
    ):
        table.add_column(column, justify="right")
    for dim in dims or [2048, 128]:
        for mag in mags or sorted(PAPER_PATCHES):
            with progress() as bar:
                bar.add_task(f"{mag:g}x, {dim}-d", total=None)
                result = bench_search(mag, dim, dtype)
            table.add_row(
                f"{mag:g}x",
                str(dim),
                f"{result.patches:,}",
                f"{result.seconds:.1f} s",
                f"{result.paper_seconds / 60:g} min",
                f"{result.paper_seconds / result.seconds:,.0f}x",
                f"{result.peak_rss_gb:.1f} GB",
            )
    console.print(table)


def bench_extract_command(
    slide_path: Annotated[
        Path | None, typer.Argument(help="Slide (default: the TCGA fixture).")
    ] = None,
    mag: Annotated[float, typer.Option("--mag")] = 20.0,
    encoder_names: Annotated[
        list[str] | None,
        typer.Option("--encoder", help=ENCODER_HELP + " Repeat for several; see `encoders`."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Local checkpoint (one encoder).")
    ] = None,
    random_weights: Annotated[
        bool,
        typer.Option(
            "--random-weights",
            help="Foundation models: random weights in the real layout (throughput only).",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    tiles: Annotated[int, typer.Option("--tiles", min=1, help="Tissue tiles to embed.")] = 256,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Extraction throughput against the encoder's own forward throughput. A foundation model
    whose weights are not on this machine runs with random weights in its real layout (the
    same computation, so the same speed), and the table says so."""
    from histosearch.bench.extraction import (
        bench_extraction,
        benchmark_encoder,
        extraction_slide,
    )
    from histosearch.embed import default_device
    from histosearch.encoders import EncoderError
    from histosearch.slide import open_slide

    names = encoder_names or [DEFAULT_ENCODER]
    if weights is not None and len(names) > 1:
        raise typer.BadParameter("--weights takes one encoder", param_hint="--weights")
    path, power = extraction_slide(data, slide_path)
    device = default_device()
    table = Table(title=f"Extraction from {path.name} at {mag:g}x, {device}")
    for column in ("encoder", "weights", "tiles", "model alone img/s", "pipeline img/s", "ratio"):
        table.add_column(column, justify="left" if column in ("encoder", "weights") else "right")
    for name in names:
        try:
            encoder, source = benchmark_encoder(name, weights, random_weights)
        except EncoderError as error:
            error_console.print(f"[red]{name}:[/red] {error}", highlight=False)
            continue
        encoder.to(device)
        with progress() as bar, open_slide(path, objective_power=power) as slide:
            bar.add_task(f"{name}", total=None)
            result = bench_extraction(slide, mag, encoder, batch_size, tiles)
        row = (
            result.encoder,
            source,
            str(result.tiles),
            f"{result.model_per_s:.1f}",
            f"{result.pipeline_per_s:.1f}",
            f"{result.ratio:.2f}",
        )
        table.add_row(*row)
        error_console.print(" | ".join(row), highlight=False)  # each as it is measured
    console.print(table)


def bench_tissue_command(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Accuracy of both tissue detectors (default settings) on the labelled fixture tiles."""
    from histosearch.bench.tissue import LABELLED_TILES, bench_tissue

    tiles = data / LABELLED_TILES
    table = Table(title=f"Tissue detection on {len(list(tiles.glob('*.png')))} labelled tiles")
    for column in ("method", "settings", "accuracy", "wrong"):
        table.add_column(column)
    for result in bench_tissue(tiles):
        settings = ", ".join(f"{k}={v}" for k, v in result.settings.items())
        table.add_row(result.method, settings, f"{result.accuracy:.3f}", ", ".join(result.wrong))
    console.print(table)


def bench_resume_command(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
    trials: Annotated[int, typer.Option("--trials", min=1)] = 20,
    groups_per_class: Annotated[int, typer.Option("--groups-per-class", min=1)] = 4,
    work: Annotated[
        Path | None, typer.Option("--work", help="Scratch folder (default: a temporary one).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """kill -9 `index` at random moments and resume: is every resumed archive equal to an
    uninterrupted one (catalog, features, search results, no temporary files left)?"""
    from histosearch.bench.resume import bench_resume, resume_index_args

    with tempfile.TemporaryDirectory() as scratch:
        folder = work or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        manifest = folder / "lc.csv"
        write_lc25000_subset(data / "lc25000-lung-dev", manifest, groups_per_class)
        args = resume_index_args(manifest, data)
        table = Table(title="kill -9 during index, then resume")
        for column in (
            "trial",
            "killed after s",
            "rows then",
            "searchable",
            ".tmp then",
            "resume exit",
            "equal",
            ".tmp left",
        ):
            table.add_column(column, justify="right")

        def show(trial) -> None:
            table.add_row(
                str(len(table.rows) + 1),
                f"{trial.kill_after_s:.1f}",
                str(trial.rows_at_kill),
                str(trial.searchable_at_kill),
                str(trial.temporary_files_at_kill),
                str(trial.resumed_exit),
                "yes" if trial.difference is None else trial.difference,
                str(trial.temporary_files_left),
            )
            error_console.print(f"trial {len(table.rows)}/{trials} done", highlight=False)

        result = bench_resume(args, folder, trials, seed, show)
    console.print(table)
    console.print(
        f"uninterrupted run: {result.reference_seconds:.1f} s, {result.rows} entries; "
        f"{result.equal} of {len(result.trials)} resumed archives equal to it",
        highlight=False,
    )
    if result.equal != len(result.trials):
        raise typer.Exit(1)


def bench_api_command(
    archive_dir: Annotated[
        Path, typer.Option("--archive", help="An archive with patch images (e.g. the demo's).")
    ] = Path("demo-output/archive"),
    queries: Annotated[int, typer.Option("--queries", min=2)] = 50,
) -> None:
    """Start-up time of `histosearch --help` (and each command's) and a warm Searcher's
    patch- and slide-query latency."""
    from histosearch.bench.api import bench_api

    result = bench_api(archive_dir, queries=queries)
    table = Table(title="Command-line start-up (best of 3 fresh processes)")
    table.add_column("command")
    table.add_column("seconds", justify="right")
    for command, seconds in result.help_seconds.items():
        table.add_row(command, f"{seconds:.2f}")
    table.add_row('python -c "import typer, rich"', f"{result.baseline_seconds:.2f}")
    console.print(table)
    console.print(
        f"histosearch --help takes {result.help_ratio:.1f}x the time of "
        f'python -c "import typer, rich" in this run (goal: under 3x)',
        highlight=False,
    )
    console.print(
        f"Searcher on {archive_dir}: opened in {result.open_seconds:.2f} s; over "
        f"{result.queries} queries, patch query (an image file, embedded) p50 "
        f"{result.patch_query_p50 * 1000:.0f} ms, p95 {result.patch_query_p95 * 1000:.0f} ms; "
        f"slide query (an archived slide) p50 {result.slide_query_p50 * 1000:.0f} ms, "
        f"p95 {result.slide_query_p95 * 1000:.0f} ms",
        highlight=False,
    )


def bench_scale_command(
    patches: Annotated[int, typer.Option("--patches", min=1000, help="Archive size N.")],
    dim: Annotated[int, typer.Option("--dim", help="Searchable (reduced) dimension.")] = 128,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Slide queries.")] = 40,
    exact_queries: Annotated[
        int | None,
        typer.Option(
            "--exact-queries",
            help="Of those, how many are compared with the exact answers (one blocked pass).",
        ),
    ] = None,
    exact_timed: Annotated[
        int,
        typer.Option(
            "--exact-timed", min=0, help="Of those, how many are also timed by the exact scan."
        ),
    ] = 10,
    kind: Annotated[
        str, typer.Option("--kind", help="FAISS factory string, or auto (by archive size).")
    ] = "auto",
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists probed.")] = None,
    candidates: Annotated[
        int | None, typer.Option("--candidates", min=1, help="Slides shortlisted by stage 1.")
    ] = None,
    neighbours: Annotated[
        int | None,
        typer.Option(
            "--neighbours", min=1, help="Index neighbours per query patch (default: the search's)."
        ),
    ] = None,
    sketch_rows: Annotated[
        int | None,
        typer.Option(
            "--sketch-rows",
            min=1,
            help="Rows per slide in the sketch measure (default: the search's).",
        ),
    ] = None,
    max_sketched: Annotated[
        int | None,
        typer.Option(
            "--max-sketched",
            min=1,
            help="Slides sketched at most per query (default: the search's).",
        ),
    ] = None,
    reuse: Annotated[
        bool,
        typer.Option(
            "--reuse",
            help="Use the store, index and exact answers an earlier run of the same archive "
            "left in --workdir (to compare stage 1's knobs on one build).",
        ),
    ] = False,
    filter_keep: Annotated[
        list[float] | None,
        typer.Option(
            "--filter-keep", min=0.0001, max=1, help="Also time queries filtered to this share."
        ),
    ] = None,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Where the store and index go (default: a temp folder)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """Two-stage slide search, exact scan and patch search over a synthetic N-patch archive."""
    from histosearch.bench.scale import bench_scale, write_results
    from histosearch.search.two_stage import Shortlist

    knobs = dict(
        candidates=candidates,
        neighbours=neighbours,
        sketch_rows=sketch_rows,
        max_sketched=max_sketched,
    )

    def run(folder: Path) -> None:
        with progress() as bar:
            task = bar.add_task("", total=patches)
            result = bench_scale(
                patches,
                dim,
                folder,
                data,
                encoder_name,
                queries=queries,
                exact_queries=exact_queries,
                exact_timed=exact_timed,
                kind=kind,
                nprobe=nprobe,
                shortlist=Shortlist(**{k: v for k, v in knobs.items() if v is not None}),
                reuse=reuse,
                filter_keep=tuple(filter_keep or ()),
                # writing the store and the exact pass each count the patches they pass
                on_stage=lambda stage: bar.update(task, description=stage, completed=0),
                on_progress=lambda n: bar.advance(task, n),
            )
        table = Table(title=f"Scale: {result.patches:,} patches, {result.slides:,} slides, {dim}-d")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, value in result.figures().items():
            table.add_row(key, f"{value:,}" if isinstance(value, int) else f"{value:.4g}")
        details = ("index", "queries", "exact_queries", "exact_pass_s", "exact_screened")
        sizes = ("generate_s", "store_gb", "index_gb", "sketch_s", "sketch_gb", "rewrite_s")
        for key in (*details, *sizes):
            value = getattr(result, key)
            table.add_row(key, value if isinstance(value, str) else f"{value:.4g}")
        table.add_row("stage 1", ", ".join(f"{k} {v}" for k, v in result.shortlist.items()))
        if result.reused:
            table.add_row("build", f"reused from {folder}")
        for row in result.filtered:
            share = f"filter keeping {row['keep']:.0%} ({row['slides']:,} slides)"
            table.add_row(f"{share}: slide query p50 s", f"{row['query_p50_s']:.4g}")
            table.add_row(f"{share}: exact scan p50 s", f"{row['exact_p50_s']:.4g}")
            table.add_row(f"{share}: top5 agreement", f"{row['top5_agreement']:.4g}")
        console.print(table)
        if json_out is not None:
            write_results([result], json_out)

    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        run(workdir)


def bench_scale_plot_command(
    results: Annotated[list[Path], typer.Argument(help="JSON files of `bench scale --json`.")],
    out: Annotated[Path, typer.Option("--out", help="The image.")] = Path("docs/scale-latency.png"),
) -> None:
    """Log-log plot of query latency against archive size from `bench scale` results."""
    from histosearch.bench.scale import plot_latency

    plot_latency(results, out)
    console.print(f"wrote {out}")


def bench_serve_command(
    archive_dir: Annotated[
        Path, typer.Option("--archive", help="The archive to serve (default: the demo's).")
    ] = Path("demo-output/archive"),
    patch: Annotated[
        Path | None,
        typer.Option("--patch", help="Patch image to query with (default: an LC25000 patch)."),
    ] = None,
    slide: Annotated[
        int | None,
        typer.Option("--slide", help="Catalog id of the slide query and tiles (default: first)."),
    ] = None,
    queries: Annotated[int, typer.Option("--queries", min=1, help="Queries per figure.")] = 40,
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
) -> None:
    """p50/p95 latency of patch and slide queries (1 and 8 clients) and deep-zoom tiles/s."""
    from histosearch.bench.serve import bench_serve, default_patch

    results = bench_serve(archive_dir, patch or default_patch(data), slide, queries)
    table = Table(title=f"histosearch serve on {archive_dir} ({os.cpu_count()} CPU cores)")
    for column in ("request", "clients", "requests", "p50 ms", "p95 ms", "per second"):
        table.add_column(column, justify="left" if column == "request" else "right")
    for row in results:
        table.add_row(
            row.name,
            str(row.clients),
            str(row.requests),
            f"{row.p50_ms:.1f}",
            f"{row.p95_ms:.1f}",
            f"{row.per_s:.1f}",
        )
    console.print(table)


def bench_mosaic_command(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = "color-histogram",
    min_patches: Annotated[
        int, typer.Option("--min-patches", min=1, help="Slides with at least this many patches.")
    ] = 32,
    json_out: Annotated[Path, typer.Option("--json", help="Write the figures here.")] = Path(
        "docs/bench-mosaic.json"
    ),
    plot: Annotated[Path, typer.Option("--plot", help="Write the plot here.")] = Path(
        "docs/bench-mosaic.png"
    ),
) -> None:
    """Slide retrieval, storage per slide and extraction time with mosaics of 5/10/20% and
    16/32/64 tiles against every tile, on the IDC dev set's slides (leave one case out)."""
    from histosearch.bench.mosaic import bench_mosaic, plot_mosaic, write_mosaic_json

    rows, refused = bench_mosaic(
        data,
        encoder_name,
        min_patches=min_patches,
        on_mosaic=lambda m: console.print(f"mosaic {m}"),
    )
    table = Table(title=f"Mosaics on {rows[0].slides} IDC slides ({encoder_name})")
    for column in ("mosaic", "tiles/slide", "store KB/slide", "select CPU s", "embed CPU s"):
        table.add_column(column, justify="right")
    for metric in rows[0].metrics:
        table.add_column(metric, justify="right")
    for r in rows:
        table.add_row(
            r.mosaic,
            f"{r.tiles_per_slide:.1f}",
            f"{r.store_kb_per_slide:.1f}",
            f"{r.select_cpu_s:.2f}",
            f"{r.embed_cpu_s:.2f}",
            *(f"{v:.3f}" for v in r.metrics.values()),
        )
    console.print(table)
    console.print(f"{refused} patches refused as an archive refuses them (under 32 px, flat)")
    meta = {"encoder": encoder_name, "min_patches": min_patches, "set": "idc-breast-dev"}
    meta["patches_refused"] = refused
    write_mosaic_json(rows, meta, json_out)
    plot_mosaic(rows, plot)
    console.print(f"wrote {json_out} and {plot}")


def bench_shards_command(
    data: Annotated[Path, typer.Option("--data", help="The shared data folder.")] = SHARED_DATA,
    patches: Annotated[
        int, typer.Option("--patches", min=1000, help="Synthetic patches.")
    ] = 150_000,
    shards: Annotated[int, typer.Option("--shards", min=2, help="Shards of the sharded copy.")] = 4,
    queries: Annotated[int, typer.Option("--queries", min=2, help="Archived slides queried.")] = 40,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="Threads only.")] = False,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Where both archives are built (default: a temp folder)."),
    ] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Write the figures here.")] = Path(
        "docs/bench-shards.json"
    ),
) -> None:
    """The latency a sharded search adds by its fan-out and merge: the same synthetic slides
    as one archive and as N shards, queried through one Searcher, the shards in threads and
    the shards as Ray actors (a local Ray instance), interleaved."""
    import json

    from histosearch.bench.shards import bench_shards

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as temporary:
        result = bench_shards(
            workdir or Path(temporary),
            data,
            n_patches=patches,
            n_shards=shards,
            queries=queries,
            ray=not no_ray,
            on_stage=lambda stage: console.print(stage, highlight=False),
        )
    table = Table(
        title=f"{result.slides} slides, {result.patches:,} patches ({result.dim}-d): one "
        f"archive against {result.shards} shards, {result.queries} slide queries, top {result.k}"
    )
    columns = ("search", "p50 ms", "p95 ms", "added p50 ms", "top k = one's", "= exact scan")
    for column in columns:
        table.add_column(column, justify="right")
    for mode in result.p50_s:
        table.add_row(
            mode,
            f"{1000 * result.p50_s[mode]:.1f}",
            f"{1000 * result.p95_s[mode]:.1f}",
            "" if mode == "one" else f"{result.added_ms(mode):+.1f}",
            f"{result.same_as_one[mode]:.0%}",
            f"{result.same_as_exact[mode]:.0%}",
        )
    console.print(table)
    console.print(
        f"built in {result.build_s['one']:.0f} s (one) and {result.build_s['sharded']:.0f} s "
        f"(sharded), {result.cpus} CPUs",
        highlight=False,
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    console.print(f"wrote {json_out}")

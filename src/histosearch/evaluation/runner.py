"""One `eval` run, as `index` runs `Archive.add`: the labelled set loaded from its manifest
or archive, then the patch protocol for each encoder (its embeddings cached in the output
folder), with a comparison of several, or the slide protocol on a manifest of whole slides.
Progress goes to `on_progress(stage, done, total)`; the results come back as dataclasses.

    evaluation = Evaluation.load(EvalSettings(manifest=Path("m.csv"), encoders=(("uni", None),)))
    result = evaluation.run()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from histosearch.errors import HistosearchError
from histosearch.evaluation.compare import EncoderResult, next_run_folder, write_comparison
from histosearch.evaluation.embedding import (
    ProgressCallback,
    create_encoder,
    embed_patches,
    embed_slide,
    no_progress,
)
from histosearch.evaluation.labelled import (
    LabelledSet,
    archive_labelled_set,
    check_evaluable,
    group_features,
    read_labelled_manifest,
)
from histosearch.evaluation.protocols import PatchEvaluation, evaluate_patches, evaluate_slides
from histosearch.evaluation.report import save_figures, write_report
from histosearch.evaluation.settings import (
    METADATA_COLUMNS,
    EncoderChoice,
    EvalSettings,
    EvalSettingsError,
)

SlideResults = dict[str, dict[str, dict[str, object]]]


@dataclass
class EncoderReport:
    """One encoder's patch protocol: its comparison row, its results and its report."""

    result: EncoderResult
    patch: PatchEvaluation
    slides: SlideResults | None  # with a slide column: the slide protocol on its groups
    folder: Path
    files: list[Path]  # report.md, metrics.json
    reused_embeddings: bool  # read from the output folder's cache, not embedded again


@dataclass
class PatchRun:
    """The patch protocol of every encoder, in the order given, in one numbered folder."""

    folder: Path
    encoders: list[EncoderReport]
    threshold: float | None = None  # the verification threshold stored in a checkpoint
    threshold_checkpoint: str | None = None
    comparison: list[Path] = field(default_factory=list)  # with several encoders


@dataclass
class SlideRun:
    """The slide protocol on a manifest of whole slides, at each magnification; the slides
    that could not be embedded are `failures` of `attempts` (slides x magnifications)."""

    folder: Path
    encoder: str
    slides: SlideResults
    files: list[Path]  # report.md, metrics.json
    failures: list[tuple[Path, str]]
    attempts: int


@dataclass
class Evaluation:
    """A run's settings, its labelled set and the encoders whose features it measures (an
    archive's own encoder, whose stored features are used, for `--archive`)."""

    settings: EvalSettings
    data: LabelledSet
    encoders: list[EncoderChoice]
    stored: np.ndarray | None = None  # an archive's features, one row per patch

    @classmethod
    def load(cls, settings: EvalSettings) -> Evaluation:
        """Read the labelled set (a manifest's files are checked, not yet opened)."""
        if settings.manifest is not None:
            data = read_labelled_manifest(
                settings.manifest, settings.skip_missing, settings.columns
            )
            return cls(settings, data, list(settings.encoders))
        data, stored, encoder = archive_labelled_set(settings.archive)
        return cls(settings, data, [(encoder, None)], stored)

    @property
    def exclude(self) -> str:
        """The exclusion column, or none; auto is the first metadata column the set has."""
        if self.settings.exclude != "auto":
            return self.settings.exclude
        return next((c for c in METADATA_COLUMNS if self.data.column(c)), "none")

    @property
    def exclude_column(self) -> str | None:
        """The column whose matches are never neighbours, None for none."""
        return None if self.exclude == "none" else self.exclude

    @cached_property
    def of_slides(self) -> bool:
        """A manifest of whole slides (the slide protocol), not of patches."""
        from histosearch.embed import is_patch_file

        manifest = self.settings.manifest is not None
        return manifest and not is_patch_file(self.data.paths[0], self.settings.tile_size)

    def check(self) -> None:
        """Refuse, before any work, a set or a choice of encoders that cannot be evaluated."""
        check_evaluable(self.data, self.settings.ks, self.exclude_column)
        if self.of_slides and len(self.encoders) > 1:
            raise EvalSettingsError("encoders", "compare encoders on a manifest of patches")
        name = self.encoders[0][0]
        checkpoint = name.endswith(".pt") and Path(name).is_file()
        if self.settings.save_threshold and not self.of_slides and not checkpoint:
            raise EvalSettingsError(
                "save_threshold", "only a trained checkpoint.pt stores a threshold"
            )

    def run(
        self,
        on_progress: ProgressCallback = no_progress,
        on_encoder: Callable[[EncoderReport], None] | None = None,
    ) -> PatchRun | SlideRun:
        """Check, then evaluate into a new numbered folder of the output folder;
        `on_encoder` gets each encoder's report as soon as it is written."""
        self.check()
        label = "+".join(Path(name).name for name, _ in self.encoders)
        folder = next_run_folder(self.settings.out, label)
        if self.of_slides:
            return self._run_slides(folder, on_progress)
        return self._run_patches(folder, on_progress, on_encoder)

    def _run_patches(
        self,
        run: Path,
        on_progress: ProgressCallback,
        on_encoder: Callable[[EncoderReport], None] | None,
    ) -> PatchRun:
        settings = self.settings
        result = PatchRun(run, [])
        for name, weights in self.encoders:
            folder = run if len(self.encoders) == 1 else run / name.strip("/").replace("/", "-")
            if self.stored is not None:
                features, fingerprint, dim, reused = (
                    self.stored,
                    "archive",
                    self.stored.shape[1],
                    False,
                )
            else:
                features, fingerprint, dim, reused = self._patch_features(
                    name, weights, on_progress
                )
            report = self._evaluate_patches(
                features, (name, fingerprint, dim), reused, folder, run, on_progress
            )
            result.encoders.append(report)
            if on_encoder is not None:
                on_encoder(report)
        if settings.save_threshold:
            from histosearch.train.checkpoint import save_threshold

            result.threshold_checkpoint = self.encoders[0][0]
            result.threshold = float(result.encoders[0].patch.metrics["verification threshold"])
            save_threshold(Path(result.threshold_checkpoint), result.threshold)
        if len(result.encoders) > 1:
            summary = {
                "source": self.data.source,
                "items": len(self.data.labels),
                "classes": sorted(set(self.data.labels)),
                "exclude": self.exclude,
                "metric": settings.metric,
                "seed": settings.seed,
            }
            rows = [report.result for report in result.encoders]
            files = write_comparison(run, summary, rows, max(settings.ks))
            result.comparison = [run / name for name in files]
        return result

    def patch_protocol(self, features: np.ndarray) -> PatchEvaluation:
        """The patch protocol (leave-one-out retrieval, ADDR, pair verification, linear probe)
        on features of the set's items, one row each, with the run's settings."""
        s = self.settings
        return evaluate_patches(
            features,
            self.data,
            list(s.ks),
            self.exclude_column,
            s.metric,
            s.pairs,
            s.near_far,
            s.seed,
        )

    def slide_protocol(self, features: np.ndarray) -> SlideResults:
        """Leave-one-out slide search with the WSI measure on the patches gathered into
        slides by the run's slide column (the query's patient excluded when the run
        excludes patients), full and reduced."""
        s, data, column = self.settings, self.data, self.settings.slide_column
        slide_features, slide_labels, names = group_features(features, data, column)
        patients = data.column("patient")
        keys = None
        if self.exclude_column == "patient" and patients is not None and column != "patient":
            by_slide = dict(zip(data.column(column), patients, strict=True))
            keys = [by_slide[n] for n in names]
        reduction = (s.reduction, s.n_features)
        return {
            f"slides = {column}": evaluate_slides(
                slide_features, slide_labels, list(s.ks), [reduction], keys
            )
        }

    def _patch_features(
        self, name: str, weights: Path | None, on_progress: ProgressCallback
    ) -> tuple[np.ndarray, str, int, bool]:
        """(features, weights fingerprint, dim, reused) of the patch set, from the cache in
        the output folder when the encoder, its weights and every image are unchanged."""
        from histosearch.evaluation.cache import cached_embeddings, embedding_key, save_embeddings

        encoder = create_encoder(name, weights)
        key = embedding_key(name, encoder.fingerprint)
        out, paths = self.settings.out, self.data.paths
        features = cached_embeddings(out, key, paths)
        if features is not None:
            return features, encoder.fingerprint, encoder.dim, True
        features = embed_patches(
            paths, encoder, self.settings, f"embedding with {name}", on_progress
        )
        save_embeddings(out, key, paths, features)
        return features, encoder.fingerprint, encoder.dim, False

    def _evaluate_patches(
        self,
        features: np.ndarray,
        encoder: tuple[str, str, int],
        reused: bool,
        folder: Path,
        run: Path,
        on_progress: ProgressCallback,
    ) -> EncoderReport:
        """The patch protocol (and the slide protocol on a slide column's groups) on one
        encoder's features (`encoder`: name, weights fingerprint, dim); its report goes to
        `folder`."""
        name, fingerprint, dim = encoder
        s, data = self.settings, self.data
        ks, reduction = list(s.ks), (s.reduction, s.n_features)
        stage = f"{name}: retrieval, pairs and linear probe"
        on_progress(stage, 0, None)
        patch = self.patch_protocol(features)
        on_progress(stage, 1, 1)
        slides = None
        if s.slide_column is not None:
            stage = f"{name}: slide retrieval, patches gathered by {s.slide_column}"
            on_progress(stage, 0, None)
            slides = self.slide_protocol(features)
            on_progress(stage, 1, 1)
        report_settings = {
            "source": data.source,
            "encoder": name,
            "weights fingerprint": fingerprint,
            "items": len(data.labels),
            "classes": sorted(set(data.labels)),
            "exclude": self.exclude,
            "metric": s.metric,
            "k": ks,
            "pairs": s.pairs,
            "near_far": None if s.near_far is None else list(s.near_far),
            "slide_column": s.slide_column,
            "reduction": f"{reduction[0]} {reduction[1]}",
            "seed": s.seed,
            "missing_skipped": len(data.missing),
        }
        folder.mkdir(parents=True, exist_ok=True)
        stages: list[str] = []

        def on_figure(figure: str) -> None:
            stages.append(f"{name}: figures, {figure}")
            on_progress(stages[-1], 0, None)

        figures = save_figures(
            folder, features, data, patch, max(ks), s.queries_per_class, s.seed, name, on_figure
        )
        on_progress(stages[-1], 1, 1)
        write_report(folder, report_settings, patch, slides, figures)
        return EncoderReport(
            EncoderResult(
                name, fingerprint, dim, patch.metrics, str(folder.relative_to(run)) or "."
            ),
            patch,
            slides,
            folder,
            [folder / "report.md", folder / "metrics.json"],
            reused,
        )

    def _run_slides(self, run: Path, on_progress: ProgressCallback) -> SlideRun:
        """The slide protocol on a manifest of whole slides, at each magnification; a slide
        that cannot be embedded is a failure, the others are evaluated."""
        s, data = self.settings, self.data
        check_resolution(data, s.mpp, s.objective_power)
        encoder = create_encoder(*self.encoders[0])
        ks, exclude_column = list(s.ks), self.exclude_column
        reduction = (s.reduction, s.n_features)
        keys_column = data.column(exclude_column) if exclude_column else None
        results: SlideResults = {}
        failures: list[tuple[Path, str]] = []
        for mag in s.mags:
            features, labels, keys = [], [], []
            stage, total = f"slides at {mag:g}x", len(data.paths)
            on_progress(stage, 0, total)
            for index, path in enumerate(data.paths):
                resolution = data.resolutions[index] if data.resolutions else (None, None)
                try:
                    tiles = embed_slide(path, encoder, mag, s, resolution)
                except HistosearchError as error:
                    failures.append((path, str(error)))
                else:
                    features.append(tiles)
                    labels.append(data.labels[index])
                    keys.append(keys_column[index] if keys_column else str(index))
                on_progress(stage, index + 1, total)
            if len(features) > max(ks):
                results[f"{mag:g}x"] = evaluate_slides(features, labels, ks, [reduction], keys)
        report_settings = {
            "source": data.source,
            "encoder": encoder.name,
            "slides": len(data.paths),
            "classes": sorted(set(data.labels)),
            "exclude": exclude_column,
            "k": ks,
            "magnifications": list(s.mags),
            "reduction": f"{reduction[0]} {reduction[1]}",
            "failed": [message for _, message in failures],
        }
        run.mkdir(parents=True, exist_ok=True)
        write_report(run, report_settings, None, results, [])
        files = [run / "report.md", run / "metrics.json"]
        return SlideRun(run, encoder.name, results, files, failures, len(data.paths) * len(s.mags))


def run_evaluation(
    settings: EvalSettings,
    on_progress: ProgressCallback = no_progress,
    on_encoder: Callable[[EncoderReport], None] | None = None,
) -> PatchRun | SlideRun:
    """Load the labelled set and evaluate it (`Evaluation.load(settings).run(...)`)."""
    return Evaluation.load(settings).run(on_progress, on_encoder)


def check_resolution(data: LabelledSet, mpp: float | None, objective_power: float | None) -> None:
    """Refuse, in one message, a slide manifest none of whose files records a resolution."""
    from histosearch.slide import open_slide

    if mpp is not None or objective_power is not None:
        return
    if data.resolutions and any(m or power for m, power in data.resolutions):
        return  # the manifest gives them
    for path in data.paths:
        try:
            with open_slide(path) as slide:
                if slide.mpp is not None or slide.objective_power is not None:
                    return
        except HistosearchError:
            continue  # an unreadable file is reported with the others later
    raise HistosearchError(
        data.source,
        f"none of the {len(data.paths)} files records its resolution (microns per pixel or "
        "objective power): give --mpp or --objective-power, or an mpp or magnification column",
    )

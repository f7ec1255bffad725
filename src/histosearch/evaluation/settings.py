"""Every setting of one `eval` run, checked where it is defined: a wrong value is refused,
naming the setting and what it may be, before any file is read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histosearch.archive.reduce import REDUCERS

# How patch neighbours are ranked (evaluation.metrics.rank_neighbours).
METRICS = ("cosine", "l2")
# The manifest columns a run can exclude by or gather patches into slides by.
METADATA_COLUMNS = ("group", "patient", "slide")
# --exclude: the first metadata column the set has, none, or one column by name.
EXCLUDE_CHOICES = ("auto", "none", *METADATA_COLUMNS)

# An encoder to evaluate and its local weights (None: the encoder's own).
EncoderChoice = tuple[str, Path | None]


class EvalSettingsError(ValueError):
    """A setting of a run that cannot be used: `setting` names it, `reason` says why."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


def encoder_choices(names: Sequence[str], weights: Path | None = None) -> list[EncoderChoice]:
    """(encoder, weights) pairs from `NAME[=WEIGHTS]` strings, and `weights` for one encoder."""
    choices: list[EncoderChoice] = []
    for name in names:
        encoder, _, path = name.partition("=")
        choices.append((encoder, Path(path) if path else None))
    if weights is not None:
        if len(choices) > 1:
            raise EvalSettingsError(
                "weights", "with several encoders give each its weights as --encoder NAME=WEIGHTS"
            )
        choices = [(choices[0][0], weights)]
    return choices


@dataclass(frozen=True)
class EvalSettings:
    """One run: a labelled manifest or an archive, the encoders (ignored for an archive,
    whose stored features are evaluated), the protocols' settings and the output folder
    (each run writes a new numbered subfolder of `out`; embeddings are cached in it)."""

    manifest: Path | None = None
    archive: Path | None = None
    encoders: tuple[EncoderChoice, ...] = ()
    # histosearch's column names and the manifest's columns read as them (inputs.column_mapping)
    columns: Mapping[str, str] = field(default_factory=dict)
    out: Path = Path("eval-output")
    # a column whose matches are never neighbours: auto (the first of METADATA_COLUMNS the
    # set has), none, or a column
    exclude: str = "auto"
    metric: str = "cosine"
    ks: tuple[int, ...] = (1, 3, 5)  # kept sorted, each once
    # patches grouped into slides by this column for the slide protocol as well
    slide_column: str | None = None
    reduction: str = "cov"
    n_features: int = 128
    pairs: int = 5000  # for ADDR and verification
    # spatial pairs: near pairs lie at most `near` apart, far pairs at least `far`
    near: float | None = None
    far: float | None = None
    skip_missing: bool = False
    mags: tuple[float, ...] = (5.0,)  # slide manifests: the magnifications compared
    mpp: float | None = None  # slides that record no resolution
    objective_power: float | None = None
    tile_size: int = 224  # images up to this size are patches, embedded whole
    save_threshold: bool = False  # store the verification threshold in the checkpoint
    queries_per_class: int = 3  # the rank gallery
    seed: int = 0
    batch_size: int = 64
    workers: int = 1

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.archive is None):
            raise EvalSettingsError("manifest", "give a manifest or --archive, not both")
        for name, value, choices in (
            ("metric", self.metric, METRICS),
            ("reduction", self.reduction, tuple(REDUCERS)),
            ("exclude", self.exclude, EXCLUDE_CHOICES),
        ):
            if value not in choices:
                raise EvalSettingsError(name, f"{value!r}: choose from {', '.join(choices)}")
        if self.slide_column is not None and self.slide_column not in METADATA_COLUMNS:
            raise EvalSettingsError(
                "slide_column",
                f"{self.slide_column!r}: choose from {', '.join(METADATA_COLUMNS)}",
            )
        object.__setattr__(self, "ks", tuple(sorted(set(self.ks))))
        object.__setattr__(self, "mags", tuple(self.mags))
        object.__setattr__(self, "encoders", tuple(self.encoders))
        if not self.ks or self.ks[0] < 1:
            raise EvalSettingsError("ks", f"ranks must be 1 or more, not {list(self.ks)}")
        if self.manifest is not None and not self.encoders:
            raise EvalSettingsError("encoders", "name at least one encoder")
        if len({name for name, _ in self.encoders}) < len(self.encoders):
            raise EvalSettingsError("encoders", "an encoder is named twice")
        if self.save_threshold and len(self.encoders) > 1:
            raise EvalSettingsError("encoders", "--save-threshold takes one encoder")
        if (self.near is None) != (self.far is None):
            raise EvalSettingsError("near_far", "give both --near and --far")
        if self.near is not None and not 0 <= self.near <= self.far:
            raise EvalSettingsError(
                "near_far", f"need 0 <= near <= far, not near {self.near:g}, far {self.far:g}"
            )
        for name, number, least in (
            ("n_features", self.n_features, 1),
            ("pairs", self.pairs, 1),
            ("tile_size", self.tile_size, 1),
            ("queries_per_class", self.queries_per_class, 1),
            ("batch_size", self.batch_size, 1),
            ("workers", self.workers, 0),
        ):
            if number < least:
                raise EvalSettingsError(name, f"must be {least} or more, not {number}")
        for name, value in (
            *(("mags", m) for m in self.mags),
            ("mpp", self.mpp),
            ("objective_power", self.objective_power),
        ):
            if value is not None and not value > 0:
                raise EvalSettingsError(name, f"must be positive, not {value:g}")
        if not self.mags:
            raise EvalSettingsError("mags", "give at least one magnification")

    @property
    def near_far(self) -> tuple[float, float] | None:
        """(near, far) when spatial pairs are asked for."""
        return None if self.near is None else (self.near, self.far)

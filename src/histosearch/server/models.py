"""The service's request and response bodies (they are its OpenAPI schema at /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# The largest integer a JSON number holds exactly (JavaScript's MAX_SAFE_INTEGER), well inside
# SQLite's 2**63 - 1: a larger id or row is refused as invalid (422) before any query.
MAX_ID = 2**53 - 1


def _json_integer(value: object) -> object:
    """An id as JSON Schema's integer: a number (6.0 is 6), not `true` or "6", which lax
    validation would read as 1 and 6."""
    if isinstance(value, bool | str):
        raise ValueError("expected an integer number")
    return value


# The bounds before the check, so that the schema states them (minimum, maximum).
CatalogId = Annotated[
    int,
    Field(ge=0, le=MAX_ID, description="Catalog id of a slide."),
    BeforeValidator(_json_integer),
]
Row = Annotated[int, Field(ge=0, le=MAX_ID), BeforeValidator(_json_integer)]
# What `ServerState.keep` issues: uuid4().hex.
QueryId = Annotated[str, Field(pattern="^[0-9a-f]{32}$", description="A search's query_id.")]
Mode = Literal["auto", "slides", "patches"]
Level = Literal["auto", "slide", "case"]
Column = Annotated[str, Field(min_length=1, max_length=200)]
Metadata = dict[str, str]
Exclusion = Literal["slide", "patient", "group"]
ModelState = Literal["loading", "ready", "failed"]
Region = Annotated[
    tuple[
        Annotated[int, Field(ge=0)],
        Annotated[int, Field(ge=0)],
        Annotated[int, Field(gt=0)],
        Annotated[int, Field(gt=0)],
    ],
    Field(description="Level-0 box [x, y, width, height] of the query slide."),
]


class Health(BaseModel):
    status: Literal["ok"]
    slides: int
    patches: int
    encoder: str
    magnification: float = Field(description="Magnification the archive's tiles were cut at.")
    tile_size: int
    auth: bool = Field(description="Whether requests need a bearer token.")
    viewer: bool = Field(description="Whether the OpenSeadragon viewer is installed.")
    model: ModelState = Field(
        description="The encoder uploads are embedded with, built in the background at "
        "start-up: loading, ready, or failed (an upload search then says why)."
    )
    model_error: str | None = Field(None, description="Why the encoder could not be built.")


class SlideInfo(BaseModel):
    id: int
    name: str
    label: str | None
    patient: str | None
    group: str | None
    patches: int
    magnification: float | None = Field(description="Scan magnification (from microns/pixel).")
    viewable: bool = Field(description="Whether the slide file can be shown (deep zoom).")
    metadata: Metadata = Field(default_factory=dict, description="Columns beyond the built-in.")


class SlidePage(BaseModel):
    total: int
    offset: int
    limit: int
    slides: list[SlideInfo]


class SearchOptions(BaseModel):
    """What every query may set."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(5, ge=1, le=100, description="How many results.")
    mode: Mode = "auto"
    exclude: list[Exclusion] | None = Field(
        None,
        description="Skip the query's own slide, patient or group (default: its slide, and "
        "at level case its case).",
    )
    where: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list,
        max_length=20,
        description="Filters combined with AND, as `search --where`: `COLUMN OP VALUE` "
        "(= != < <= > >= ~) or `COLUMN in (A, B)`.",
    )
    vote_on: Column = Field("label", description="The column the top k's consensus votes on.")
    level: Level = Field("auto", description="Rank slides, or cases by their best slide.")
    case_column: Column = Field("patient", description="The column naming each slide's case.")


class UploadOptions(SearchOptions):
    """What a search by upload may set besides: the resolution of a file that records none."""

    mpp: float | None = Field(
        None,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="Microns per pixel of the uploaded slide or image, for a file that records "
        "no resolution (as `search --mpp`).",
    )
    magnification: float | None = Field(
        None,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="Objective power it was scanned at (40 for 40x), for a file that records "
        "no resolution (as `search --objective-power`).",
    )


class SlideQuery(SearchOptions):
    """A search for an archived slide, or a region of it."""

    slide: CatalogId
    region: Region | None = None


def upload_form_schema() -> dict[str, Any]:
    """The multipart form of a search by upload: the `file` and the fields of `UploadOptions`,
    as the server validates them (a list is repeated fields; a form has no null)."""
    schema = UploadOptions.model_json_schema()
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary"}}
    for name, field in schema["properties"].items():
        variants = [v for v in field.get("anyOf", ()) if v.get("type") != "null"]
        if len(variants) == 1:  # `X | None`: X, with no null default
            field = {k: v for k, v in field.items() if k not in ("anyOf", "default")} | variants[0]
        properties[name] = field
    return {
        "type": "object",
        "required": ["file"],
        "properties": properties,
        "additionalProperties": False,
    }


class TileBox(BaseModel):
    x: int
    y: int
    size: float | None = Field(
        description="Side of the square tile in level-0 pixels (None: a patch image, whole)."
    )


class TileMatchOut(BaseModel):
    query: TileBox
    match: TileBox
    row: int = Field(description="Row of the matched patch in its slide (for its image).")
    cosine: float


class ResultRow(BaseModel):
    """One ranked slide (mode "slides") or patch (mode "patches")."""

    model_config = ConfigDict(extra="allow")

    rank: int
    slide_id: int
    slide: str = Field(description="The slide's name.")
    label: str | None
    patient: str | None
    group: str | None
    viewable: bool = Field(description="Whether the slide can be shown (deep zoom).")
    similarity: float
    percentile: float | None
    patches: int | None = Field(None, description="Slides: how many patches the slide has.")
    matches: list[TileMatchOut] | None = Field(
        None, description="Slides: for every query tile, its best tile in this slide."
    )
    patch: str | None = Field(None, description="Patches: file name or position.")
    row: int | None = Field(None, description="Patches: row in its slide (for its image).")
    tile: TileBox | None = None
    metadata: Metadata = Field(default_factory=dict, description="The slide's other columns.")
    case: str | None = Field(None, description="Level case: the case this best slide stands for.")
    case_matched: int | None = Field(None, description="Level case: its slides ranked.")
    case_slides: int | None = Field(None, description="Level case: its slides searchable.")


class ConsensusOut(BaseModel):
    """The vote of the top k on a column: votes per value, the majority (ties: the value
    ranked highest), and the share of the k agreeing with it."""

    column: str
    k: int
    votes: dict[str, int]
    majority: str | None
    agreement: float


class QueryOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    slide_id: int | None
    label: str | None
    patches: int = Field(description="How many tiles of the query were searched with.")
    region: Region | None


class SearchResponse(BaseModel):
    """`SearchResult.to_dict()` (as the CLI's --json prints it) with `query_id` (for the heat
    maps), each result's `viewable` and each match's `row`; server file paths left out."""

    query_id: str
    query: QueryOut
    mode: Literal["slides", "patches"]
    level: Literal["slide", "case"]
    where: list[str]
    note: str | None = Field(
        description="Why mode auto ranked patches for a slide or region query (it holds one "
        "tile); null otherwise."
    )
    consensus: ConsensusOut | None
    results: list[ResultRow]
    missing_shards: dict[str, str] = Field(
        description="A sharded archive's shards that did not answer (name: why): their slides "
        "are not ranked. Empty when every shard answered, and for a plain archive."
    )


class ColumnInfo(BaseModel):
    """A column a filter can name: its kind, and its values (text with few distinct values)
    or its range (numbers and dates)."""

    name: str
    kind: Literal["number", "date", "text"]
    builtin: bool
    values: list[str] | None = None
    min: str | None = None
    max: str | None = None


class HeatTile(BaseModel):
    x: int
    y: int
    cosine: float


class Heatmap(BaseModel):
    """Every tile of a result slide with its best cosine to any query tile."""

    query_id: str
    slide: int
    tile_size: float | None
    tiles: list[HeatTile]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query_id: QueryId | None = Field(
        None, description="The search the mark is about: one of this server's recent ones."
    )
    query_slide: CatalogId | None = None
    query_name: str = Field(min_length=1, max_length=500)
    region: Region | None = None
    mode: Literal["slides", "patches"]
    result_slide: CatalogId
    result_row: Row | None = None
    similarity: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    relevant: bool


class FeedbackOut(BaseModel):
    id: int


class ErrorBody(BaseModel):
    """Every error the server answers: one line naming what was refused and why."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed request (JSON nested too deep included) or unreadable upload",
        401: "Missing or wrong bearer token",
        404: "Unknown slide, tile or query",
        413: "Upload or JSON body too large (bytes or pixels)",
        415: "Upload is not an image or slide file",
        422: "Invalid parameter or body field (named in `detail`)",
    }.items()
}

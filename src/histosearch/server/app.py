"""`histosearch serve`: the search service and its web page, over `Archive` and `Searcher`.

The archive's catalog is read once at start-up and its `Searcher` loaded once, its encoder
built in the background meanwhile; requests share them (the searcher is thread-safe), plus a
cache of open slides for the deep-zoom tiles.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from histosearch.archive.catalog import SlideRecord
from histosearch.archive.feedback import Mark, add_mark
from histosearch.archive.shards import open_archive
from histosearch.errors import HistosearchError, UnknownResolutionError
from histosearch.search.filters import describe_columns
from histosearch.search.qupath import collection, file_stem, match_features
from histosearch.search.result import SearchResult
from histosearch.search.shards import searcher_for
from histosearch.server.errors import install_error_handlers
from histosearch.server.limits import JsonLimits
from histosearch.server.models import (
    ERRORS,
    ColumnInfo,
    FeedbackIn,
    FeedbackOut,
    Health,
    Heatmap,
    HeatTile,
    SearchOptions,
    SearchResponse,
    SlideInfo,
    SlidePage,
    SlideQuery,
    UploadOptions,
    upload_form_schema,
)
from histosearch.server.state import Record, ServerState, State, check_token
from histosearch.server.tiles import (
    CachedSlide,
    SlideCache,
    TileNotFound,
    encode_jpeg,
    thumbnail_jpeg,
)
from histosearch.server.uploads import receive_upload
from histosearch.slide import magnification_from_mpp

STATIC = Path(__file__).parent / "static"
OPENSEADRAGON = STATIC / "node_modules" / "openseadragon" / "build" / "openseadragon"
# The API docs' Swagger UI from npm too: the server may have no internet, and neither may
# the browser.
SWAGGER = "/static/node_modules/swagger-ui-dist"
THUMBNAIL_SIZE = 256


api = APIRouter(prefix="/api", dependencies=[Depends(check_token)], responses=ERRORS)
slides_router = APIRouter(prefix="/slides", dependencies=[Depends(check_token)], responses=ERRORS)
JPEG = {200: {"content": {"image/jpeg": {}}, "description": "A JPEG image"}}


@api.get("/health", response_model=Health)
def health(state: State) -> Health:
    """The archive served and how it was built."""
    settings = state.archive.settings
    records = state.archive.slides()
    model, model_error = state.model_state()
    return Health(
        status="ok",
        slides=len(records),
        patches=sum(r.n_patches for r in records),
        encoder=settings["encoder"],
        magnification=float(settings["magnification"]),
        tile_size=int(settings["tile_size"]),
        auth=state.token is not None,
        viewer=(OPENSEADRAGON / "openseadragon.min.js").is_file(),
        model=model,
        model_error=model_error,
    )


@api.get("/columns", response_model=list[ColumnInfo])
def columns(state: State) -> list[dict[str, object]]:
    """The columns a `where` filter can name, with their values or range: what the page's
    filter controls are built from."""
    return describe_columns(state.archive.slides(), state.archive.metadata())


@api.get("/slides", response_model=SlidePage)
def list_slides(
    state: State,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> SlidePage:
    """The catalog, a page at a time, in id order."""
    records = state.archive.slides()
    metadata = state.archive.metadata()
    return SlidePage(
        total=len(records),
        offset=offset,
        limit=limit,
        slides=[
            SlideInfo(
                id=r.id,
                name=r.name,
                label=r.label,
                patient=r.patient,
                group=r.group,
                patches=r.n_patches,
                magnification=round(magnification_from_mpp(r.mpp), 2) if r.mpp else None,
                viewable=state.viewable(r),
                metadata=metadata.of_slide(r.id),
            )
            for r in records[offset : offset + limit]
        ],
    )


@api.get("/slides/{slide_id}/thumbnail", response_class=Response, responses=JPEG)
def thumbnail(state: State, record: Record) -> Response:
    """A small JPEG of the slide (of its first patch, for a group of patches)."""
    data = state.thumbnails.get(record.id)
    if data is None:
        if state.viewable(record):
            with _open(state, record) as entry:
                pixels = entry.slide.thumbnail(THUMBNAIL_SIZE)
        else:
            pixels = state.archive.patch_image(record, 0)
        data = thumbnail_jpeg(pixels, THUMBNAIL_SIZE)
        state.thumbnails.put(record.id, data)
    return _jpeg(data)


@api.get("/slides/{slide_id}/patches/{row}.jpeg", response_class=Response, responses=JPEG)
def patch_image(state: State, record: Record, row: Annotated[int, PathParam(ge=0)]) -> Response:
    """One archived patch: its image file, or its tile cut from the slide."""
    if row >= record.n_patches:
        raise HTTPException(404, f"slide {record.id} has {record.n_patches} patches, no row {row}")
    return _jpeg(encode_jpeg(state.archive.patch_image(record, row)))


@slides_router.get("/{slide_id}.dzi", response_class=Response)
def dzi(state: State, record: Record) -> Response:
    """The Deep Zoom descriptor of a viewable slide."""
    with _open(state, record) as entry:
        return Response(entry.deep_zoom.dzi(), media_type="application/xml")


@slides_router.get(
    "/{slide_id}_files/{level}/{col}_{row}.jpeg", response_class=Response, responses=JPEG
)
def dzi_tile(
    state: State,
    record: Record,
    level: Annotated[int, PathParam(ge=0)],
    col: Annotated[int, PathParam(ge=0)],
    row: Annotated[int, PathParam(ge=0)],
) -> Response:
    """One deep-zoom tile."""
    with _open(state, record) as entry:
        try:
            data = entry.deep_zoom.tile(level, col, row)
        except TileNotFound as error:
            raise HTTPException(404, str(error)) from None
    return _jpeg(data, max_age=3600)


@api.post(
    "/search",
    response_model=SearchResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": SlideQuery.model_json_schema()},
                "multipart/form-data": {"schema": upload_form_schema()},
            },
        }
    },
)
async def search(request: Request, state: State) -> dict[str, Any]:
    """Search the archive with an archived slide (or a region of it, as JSON) or an uploaded
    patch image or slide file (multipart `file`, with `mpp` or `magnification` for a file
    that records no resolution)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with receive_upload(request, state.max_upload_bytes) as upload:
            fields = {
                key: values if key in ("exclude", "where") else values[-1]
                for key, values in upload.fields.items()
            }
            options = _validated(UploadOptions, fields)
            result = await run_in_threadpool(
                _run_search, state, str(upload.path), options, None, upload.filename
            )
            body = _response(state, result)
            body["query"]["name"] = upload.filename  # not the temporary file it was saved as
    elif content_type.startswith("application/json"):
        body = await _json_body(request)
        query = _validated(SlideQuery, body)
        record = state.record(query.slide)
        result = await run_in_threadpool(
            _run_search, state, record.id, query, query.region, record.name
        )
        body = _response(state, result)
    else:
        raise HTTPException(
            415, "send JSON (an archived slide) or multipart/form-data with a `file`"
        )
    return {"query_id": state.keep(result), **body}


@api.get("/queries/{query_id}/heatmap/{slide_id}", response_model=Heatmap)
def heatmap(state: State, query_id: str, record: Record) -> Heatmap:
    """Every tile of a slide result with its best cosine to the query's tiles."""
    match = state.match(query_id, record.id)
    cells = match.heatmap()
    return Heatmap(
        query_id=query_id,
        slide=record.id,
        tile_size=cells[0][0].size if cells else None,
        tiles=[HeatTile(x=t.x, y=t.y, cosine=round(float(c), 4)) for t, c in cells],
    )


@api.get("/queries/{query_id}/qupath/{slide_id}", response_class=Response)
def qupath(state: State, query_id: str, record: Record) -> Response:
    """A slide result's matched tiles as QuPath GeoJSON, as `search --qupath` writes them."""
    match = state.match(query_id, record.id)
    name = f"{file_stem(record.name)}-matches.geojson"
    return Response(
        json.dumps(collection(match_features(match))),
        media_type="application/geo+json",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@api.post("/feedback", response_model=FeedbackOut, status_code=201)
def feedback(state: State, mark: FeedbackIn) -> FeedbackOut:
    """Mark a result relevant or not (kept in the archive's catalog). A mark naming a
    `query_id` must agree with that search: its query slide, mode and results."""
    state.record(mark.result_slide)
    if mark.query_slide is not None:
        state.record(mark.query_slide)
    if mark.query_id is not None:
        issued = state.issued_query(mark.query_id)
        if (mark.query_slide, mark.mode) != (issued.slide, issued.mode):
            raise HTTPException(
                400,
                f"query {mark.query_id} searched slide {issued.slide} in mode {issued.mode}, "
                f"not slide {mark.query_slide} in mode {mark.mode}",
            )
        if mark.result_slide not in issued.results:
            raise HTTPException(
                400, f"slide {mark.result_slide} is not a result of query {mark.query_id}"
            )
    return FeedbackOut(id=add_mark(state.archive.catalog, Mark(**mark.model_dump())))


def _response(state: ServerState, result: SearchResult) -> dict[str, Any]:
    """`result.to_dict()` with what the page needs added and server file paths left out."""
    body = result.to_dict()
    hits = result.slides if result.mode == "slides" else result.patches
    for row, hit in zip(body["results"], hits, strict=True):
        row["viewable"] = state.viewable(hit.record)
        row.pop("path", None)
    return body


def _run_search(
    state: ServerState,
    query: int | str,
    options: SearchOptions,
    region: tuple[int, int, int, int] | None,
    name: str,
) -> SearchResult:
    exclude = options.exclude
    if exclude is None and not isinstance(query, int):
        exclude = []  # an upload is not in the archive
    # an archived slide's resolution is in the catalog; an upload's may be given with it
    upload = isinstance(options, UploadOptions)
    try:
        return state.searcher.search(
            query,
            k=options.k,
            exclude=exclude,
            mode=options.mode,
            region=region,
            where=options.where,
            vote_on=options.vote_on,
            level=options.level,
            case_column=options.case_column,
            mpp=options.mpp if upload else None,
            objective_power=options.magnification if upload else None,
        )
    except UnknownResolutionError:
        raise HTTPException(
            400,
            f"{name}: the file records neither microns per pixel nor magnification: give the "
            "upload's resolution (its mpp or magnification field)",
        ) from None
    except HistosearchError as error:
        # The temporary upload path means nothing to the client: name the upload instead.
        reason = error.reason if error.path is None else f"{name}: {error.reason}"
        raise HTTPException(400, reason) from None


def _validated(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in error.errors()]
        ) from None


async def _json_body(request: Request) -> Any:
    """The parsed body (its size and depth were checked by `JsonLimits`)."""
    try:
        return json.loads(await request.body())
    except ValueError as error:
        raise HTTPException(400, f"malformed JSON: {error}") from None


def _open(state: ServerState, record: SlideRecord) -> AbstractContextManager[CachedSlide]:
    if not state.viewable(record):
        raise HTTPException(
            404, f"slide {record.id} ({record.name}) is a group of patches, not a viewable slide"
        )
    return state.slides.use(record.id, record.path, record.mpp)


def _jpeg(data: bytes, max_age: int = 0) -> Response:
    headers = {"Cache-Control": f"private, max-age={max_age}"} if max_age else None
    return Response(data, media_type="image/jpeg", headers=headers)


def create_app(
    archive_dir: str | Path,
    token: str | None = None,
    max_upload_mb: int = 512,
    ray_address: str | None = None,
) -> FastAPI:
    """The service over the archive at `archive_dir`: its catalog read and its `Searcher`
    loaded now, so that a bad archive fails here and not on the first request; its encoder
    is built in a background thread (`/api/health` says when it is ready). A sharded archive
    is searched in threads, or by Ray actors on the cluster at `ray_address`."""
    archive = open_archive(archive_dir)
    state = ServerState(
        archive=archive,
        searcher=searcher_for(archive, ray_address=ray_address),
        slides=SlideCache(),
        token=token or None,
        max_upload_bytes=max_upload_mb * 2**20,
    )
    state.warm_encoder()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.slides.close()
        state.searcher.close()
        archive.close()

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        title="histosearch",
        summary="Content-based similarity search over a histopathology archive",
        version="0.1.0",
    )
    app.state.server = state
    app.add_middleware(JsonLimits)  # first, so that the error handlers' middleware wraps it
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(slides_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="histosearch API",
            swagger_js_url=f"{SWAGGER}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER}/favicon-32x32.png",
        )

    return app

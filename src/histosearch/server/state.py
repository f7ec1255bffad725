"""What the requests of one server share, and the FastAPI dependencies that hand it out:
the archive, its `Searcher`, the slide cache, recent results, and the token check."""

from __future__ import annotations

import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from histosearch.archive.archive import Archive
from histosearch.archive.catalog import ArchiveError, SlideRecord
from histosearch.search.result import SearchResult, SlideMatch
from histosearch.search.searcher import Searcher
from histosearch.server.models import MAX_ID
from histosearch.server.tiles import SlideCache
from histosearch.slide import is_dicomweb

KEPT_QUERIES = 64  # results kept for their heat maps, most recent first
KEPT_QUERY_IDS = 10_000  # searches a feedback mark may name (a few ints each)
KEPT_THUMBNAILS = 2048


@dataclass(frozen=True)
class IssuedQuery:
    """What a feedback mark about one of this server's searches must agree with."""

    slide: int | None  # the archived query slide; None for an upload
    mode: str
    results: frozenset[int]  # slide ids of its results


class Recent:
    """A thread-safe mapping that keeps only its `capacity` most recently stored items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            return self._items.get(key)

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


@dataclass
class ServerState:
    """What every request shares."""

    archive: Archive
    searcher: Searcher
    slides: SlideCache
    token: str | None
    max_upload_bytes: int

    def __post_init__(self) -> None:
        self.results = Recent(KEPT_QUERIES)  # query id -> {slide id: SlideMatch}
        self.issued = Recent(KEPT_QUERY_IDS)  # query id -> IssuedQuery
        self.thumbnails = Recent(KEPT_THUMBNAILS)  # slide id -> JPEG bytes
        self._viewable: dict[int, bool] = {}
        self.model = "loading"  # the encoder's build at start-up: loading, ready or failed
        self.model_error: str | None = None

    def model_state(self) -> tuple[str, str | None]:
        """The encoder's state and why it failed: ready once built, by the warm-up or by a
        later upload (after a failed warm-up, the weights may have been put in place)."""
        if self.searcher.encoder_ready:
            return "ready", None
        return self.model, self.model_error

    def warm_encoder(self) -> threading.Thread:
        """Build the searcher's encoder in a background thread, so that the server answers
        meanwhile and its first upload search does not wait for the build."""

        def build() -> None:
            try:
                self.searcher.load_encoder()
            except Exception as error:  # a thread's error is lost unless kept: health shows it
                self.model_error = getattr(error, "reason", None) or str(error)
                self.model = "failed"
            else:
                self.model = "ready"

        # not a daemon: a process ending during the build waits for it (seconds) instead of
        # killing the thread inside torch, which aborts the process ("terminate called ...")
        thread = threading.Thread(target=build, name="histosearch-warm-encoder")
        thread.start()
        return thread

    def record(self, slide_id: int) -> SlideRecord:
        """The catalog row of `slide_id` (slides indexed while serving included), else 404."""
        try:
            return self.archive.get(slide_id)
        except ArchiveError:
            raise HTTPException(404, f"no slide with id {slide_id} in the archive") from None

    def viewable(self, record: SlideRecord) -> bool:
        """Whether the record is a slide file or a DICOMweb slide (deep zoom), not a group of
        patches."""
        if record.id not in self._viewable:
            self._viewable[record.id] = is_dicomweb(record.path) or Path(record.path).is_file()
        return self._viewable[record.id]

    def keep(self, result: SearchResult) -> str:
        """Remember a search result for its heat maps; returns its query id."""
        query_id = uuid.uuid4().hex
        matches = {match.record.id: match for match in result.slides}
        self.results.put(query_id, matches)
        hits = result.slides if result.mode == "slides" else result.patches
        results = frozenset(hit.record.id for hit in hits)
        self.issued.put(query_id, IssuedQuery(result.query.slide_id, result.mode, results))
        return query_id

    def issued_query(self, query_id: str) -> IssuedQuery:
        """The search `query_id` names, if this server answered it recently, else 404."""
        issued = self.issued.get(query_id)
        if issued is None:
            raise HTTPException(
                404,
                f"query_id {query_id} was not issued by this server (it knows its last "
                f"{KEPT_QUERY_IDS} searches, since it started): search again, then mark",
            )
        return issued

    def match(self, query_id: str, slide_id: int) -> SlideMatch:
        matches = self.results.get(query_id)
        if matches is None:
            raise HTTPException(404, f"no recent query {query_id} (only the last 64 are kept)")
        match = matches.get(slide_id)
        if match is None:
            raise HTTPException(404, f"slide {slide_id} is not a slide result of query {query_id}")
        return match


def get_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]
bearer = HTTPBearer(auto_error=False, description="Needed when the server was given --token.")


def check_token(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """Every /api and /slides request carries the server's token, when it has one."""
    if state.token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), state.token.encode()):
        raise HTTPException(
            401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )


def slide_record(state: State, slide_id: Annotated[int, PathParam(ge=0, le=MAX_ID)]) -> SlideRecord:
    return state.record(slide_id)


Record = Annotated[SlideRecord, Depends(slide_record)]

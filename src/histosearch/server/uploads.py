"""Uploaded query files: streamed to a private temporary file, capped in bytes and pixels."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from histosearch.inputs import SLIDE_SUFFIXES
from histosearch.slide import IMAGE_SUFFIXES, open_slide

# A plain image is decoded whole into memory (3 bytes a pixel): 8000 x 8000 at most.
MAX_IMAGE_PIXELS = 64_000_000
# A slide is read tile by tile, but its grid is planned from its size: 200k x 200k at most.
MAX_SLIDE_PIXELS = 40_000_000_000


class UploadRejected(Exception):
    """An upload the server will not search; `status` is the HTTP status that says why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Upload:
    """An uploaded file saved under a name of the server's choosing, and the form's fields."""

    path: Path
    filename: str
    fields: dict[str, list[str]]


async def _capped(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, stopping with 413 as soon as it runs past `limit` bytes."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise UploadRejected(413, f"the upload exceeds the {limit // 2**20} MB limit")
        yield chunk


@asynccontextmanager
async def receive_upload(request: Request, limit: int) -> AsyncIterator[Upload]:
    """Parse a multipart body with one `file` part into a temporary file, removed on exit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadRejected(413, f"the upload exceeds the {limit // 2**20} MB limit")
    parser = MultiPartParser(request.headers, _capped(request, limit), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise UploadRejected(400, f"malformed multipart body: {error.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise UploadRejected(400, "the multipart body has no `file` part")
        filename = Path(upload.filename or "").name
        suffix = Path(filename).suffix.lower()
        if suffix not in SLIDE_SUFFIXES:
            raise UploadRejected(
                415,
                f"{filename or 'the upload'}: not an image or slide file "
                f"(expected one of {', '.join(sorted(SLIDE_SUFFIXES))})",
            )
        fields: dict[str, list[str]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(key, []).append(value)
        with tempfile.TemporaryDirectory(prefix="histosearch-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"  # never a client-given name
            with path.open("wb") as out:
                shutil.copyfileobj(upload.file, out, 2**20)
            check_pixels(path, filename)
            yield Upload(path, filename, fields)
    finally:
        await form.close()


def check_pixels(path: Path, filename: str) -> None:
    """Refuse an empty file, a decompression bomb, or a file no backend reads."""
    if path.stat().st_size == 0:
        raise UploadRejected(400, f"{filename}: the file is empty")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError as error:
            raise UploadRejected(413, f"{filename}: decompression bomb refused ({error})") from None
        except Exception as error:
            raise UploadRejected(400, f"{filename}: not a readable image ({error})") from None
        limit = MAX_IMAGE_PIXELS
    else:
        try:
            with open_slide(path) as slide:
                width, height = slide.dimensions
        except Exception as error:
            reason = getattr(error, "reason", str(error))
            raise UploadRejected(400, f"{filename}: not a readable slide ({reason})") from None
        limit = MAX_SLIDE_PIXELS
    if width * height > limit:
        raise UploadRejected(
            413, f"{filename}: {width}x{height} pixels exceeds the {limit:,}-pixel limit"
        )

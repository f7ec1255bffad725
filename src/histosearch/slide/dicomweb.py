"""DICOM whole-slide images on a DICOMweb server, read through wsidicom's DICOMweb client
(QIDO-RS finds the instances, WADO-RS fetches their metadata and the frames as tiles).

A slide is named `dicomweb://HOST:PORT/PATH/studies/UID[/series/UID]` (`dicomwebs://` for
HTTPS): a study's microscopy series are read as one slide, a series alone when it is named.
Credentials come from the environment, never from the URL (which is what logs and the
catalog keep): HISTOSEARCH_DICOMWEB_TOKEN (a bearer token), or the file that
HISTOSEARCH_DICOMWEB_TOKEN_FILE names, or HISTOSEARCH_DICOMWEB_USER and
HISTOSEARCH_DICOMWEB_PASSWORD (HTTP basic).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient
from requests.auth import AuthBase, HTTPBasicAuth
from wsidicom import WsiDicom
from wsidicom.errors import WsiDicomNotFoundError
from wsidicom.web import WsiDicomWebClient

from histosearch.errors import SlideReadError
from histosearch.slide.dicom import WsiDicomSlide

SCHEMES = {"dicomweb": "http", "dicomwebs": "https"}
# `Path` folds the two slashes after the scheme into one: both spellings are recognised.
_ADDRESS = re.compile(
    r"^(?P<scheme>dicomwebs?):/{1,2}(?P<host>[^/]+)(?P<prefix>(?:/[^/]+)*?)"
    r"/studies/(?P<study>[0-9.]+)(?:/series/(?P<series>[0-9.]+))?/?$"
)
TOKEN_ENV = "HISTOSEARCH_DICOMWEB_TOKEN"
TOKEN_FILE_ENV = "HISTOSEARCH_DICOMWEB_TOKEN_FILE"
USER_ENV, PASSWORD_ENV = "HISTOSEARCH_DICOMWEB_USER", "HISTOSEARCH_DICOMWEB_PASSWORD"
TIMEOUT_ENV = "HISTOSEARCH_DICOMWEB_TIMEOUT"
# Seconds to connect, and to wait for the next bytes of an answer.
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 10.0
MICROSCOPY_MODALITY = "SM"


@dataclass(frozen=True)
class DicomWebAddress:
    """A study or series on a DICOMweb server."""

    scheme: str
    host: str
    prefix: str
    study: str
    series: str | None

    @property
    def url(self) -> str:
        """The canonical `dicomweb://` URL (what the catalog stores)."""
        series = f"/series/{self.series}" if self.series else ""
        return f"{self.scheme}://{self.host}{self.prefix}/studies/{self.study}{series}"

    @property
    def service(self) -> str:
        """The DICOMweb service root, over HTTP(S)."""
        return f"{SCHEMES[self.scheme]}://{self.host}{self.prefix}"


def parse_dicomweb(source: str | Path) -> DicomWebAddress | None:
    """The address `source` names, or None when it is not a DICOMweb URL; a DICOMweb URL
    that is malformed or carries credentials is refused."""
    text = str(source)
    if not re.match(r"^dicomwebs?:/", text):
        return None
    match = _ADDRESS.match(text)
    if match is None:
        raise SlideReadError(
            text,
            "not a DICOMweb slide: expected dicomweb://HOST:PORT/PATH/studies/UID[/series/UID]",
        )
    if "@" in match["host"]:
        host = match["host"].rsplit("@", 1)[1]
        raise SlideReadError(
            f"{match['scheme']}://{host}",
            f"credentials in a URL are refused (they would be stored and logged): set "
            f"{TOKEN_ENV}, {TOKEN_FILE_ENV} or {USER_ENV} and {PASSWORD_ENV}",
        )
    return DicomWebAddress(
        match["scheme"], match["host"], match["prefix"], match["study"], match["series"]
    )


def is_dicomweb(source: str | Path) -> bool:
    """Whether `source` is a DICOMweb URL (well formed or not)."""
    return re.match(r"^dicomwebs?:/", str(source)) is not None


class _BearerToken(AuthBase):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


def credentials() -> AuthBase | None:
    """The DICOMweb credentials the environment gives, if any."""
    token = os.environ.get(TOKEN_ENV)
    if not token and (token_file := os.environ.get(TOKEN_FILE_ENV)):
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise SlideReadError(
                token_file, f"cannot read the DICOMweb token file: {error.strerror}"
            ) from None
    if token:
        return _BearerToken(token)
    user = os.environ.get(USER_ENV)
    if user:
        return HTTPBasicAuth(user, os.environ.get(PASSWORD_ENV, ""))
    return None


def _timeout() -> tuple[float, float]:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return CONNECT_TIMEOUT, READ_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise SlideReadError(None, f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    return min(seconds, CONNECT_TIMEOUT), seconds


class DicomWebSlide(WsiDicomSlide):
    """A DICOM WSI series on a DICOMweb server; the slide's `path` is its URL."""

    backend = "dicomweb"

    @staticmethod
    def _locate(path: str | Path) -> str:
        address = parse_dicomweb(path)
        if address is None:
            raise SlideReadError(path, "not a DICOMweb URL")
        return address.url

    def _open_handle(self) -> tuple[WsiDicom, bool]:
        address = parse_dicomweb(self.path)
        assert address is not None  # _locate checked it
        session = requests.Session()
        session.auth = credentials()
        client = DICOMwebClient(address.service, session=session, timeout=_timeout())
        # dicomweb-client retries every failure 5 times, waiting up to 16 s between tries:
        # a server that is down or refuses would take a minute to be reported.
        client.set_http_retry_params(retry=False)
        try:
            series = [address.series] if address.series else _microscopy_series(client, address)
            return WsiDicom.open_web(WsiDicomWebClient(client), address.study, series), True
        except SlideReadError:
            raise
        except WsiDicomNotFoundError as error:
            what = "series" if address.series else "study"
            raise SlideReadError(
                self.path, f"not a whole-slide image: the {what} holds no WSI pyramid ({error})"
            ) from error
        except requests.HTTPError as error:
            raise SlideReadError(self.path, _http_reason(error)) from error
        except requests.Timeout as error:
            raise SlideReadError(
                self.path, f"the server did not answer within {_timeout()[1]:g} s"
            ) from error
        except requests.ConnectionError as error:
            raise SlideReadError(
                self.path, f"no answer from {address.host}: {_connection_reason(error)}"
            ) from error
        except Exception as error:
            raise SlideReadError(self.path, f"cannot read the series: {error}") from error


def _http_reason(error: requests.HTTPError) -> str:
    status = error.response.status_code if error.response is not None else None
    if status in (401, 403):
        return (
            f"the server refused access (HTTP {status}): set {TOKEN_ENV}, {TOKEN_FILE_ENV} "
            f"or {USER_ENV} and {PASSWORD_ENV}"
        )
    if status == 404:
        return "not found on the server (HTTP 404): no such study or series"
    return f"the server answered HTTP {status}"


def _connection_reason(error: requests.ConnectionError) -> str:
    text = str(error)
    for known in ("Connection refused", "Name or service not known", "timed out"):
        if known in text:
            return known.lower()
    return "connection failed"


def _microscopy_series(client: DICOMwebClient, address: DicomWebAddress) -> list[str]:
    """The study's series of modality SM (QIDO-RS)."""
    found = client.search_for_series(address.study, fields=["Modality"])
    series = [
        s["0020000E"]["Value"][0]
        for s in found
        if s.get("00080060", {}).get("Value", [None])[0] == MICROSCOPY_MODALITY
    ]
    if not found:
        raise SlideReadError(address.url, "not found on the server: the study has no series")
    if not series:
        raise SlideReadError(
            address.url,
            f"not a whole-slide image: none of the study's {len(found)} series is of "
            "modality SM (slide microscopy)",
        )
    return series

"""DICOMweb slides against a real server: Orthanc with its DICOMweb plugin, started here on
127.0.0.1 with a free port, fed a DICOM WSI series made from the real CMU-1 fixture by
OrthancWSIDicomizer, and stopped at the end (Debian packages orthanc, orthanc-dicomweb,
orthanc-wsi; .ci/run installs them)."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from data_paths import CMU
from fastapi.testclient import TestClient
from PIL import Image

from histosearch import Archive, Searcher, SlideReadError, open_slide
from histosearch.bench.tiling import bench_sources
from histosearch.cli import main
from histosearch.inputs import collect_items
from histosearch.server.app import create_app
from histosearch.slide import DicomWebSlide, parse_dicomweb

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMIZER = shutil.which("OrthancWSIDicomizer") or "/usr/bin/OrthancWSIDicomizer"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "histo", "s3cret-pw"
CMU_MPP = 0.499

pytestmark = pytest.mark.skipif(
    not (Path(ORTHANC).is_file() and Path(DICOMIZER).is_file() and DICOMWEB_PLUGIN.is_file()),
    reason="Orthanc, its DICOMweb plugin or OrthancWSIDicomizer is not installed "
    "(apt-get install orthanc orthanc-dicomweb orthanc-wsi)",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Server:
    """A running Orthanc and the DICOM WSI series uploaded to it."""

    port: int
    series_dir: Path
    study: str
    series: str

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def slide_url(self) -> str:
        return (
            f"dicomweb://127.0.0.1:{self.port}/dicom-web/studies/{self.study}/series/{self.series}"
        )

    def upload(self, path: Path) -> None:
        response = requests.post(
            self.url("/instances"), data=path.read_bytes(), auth=(USER, PASSWORD), timeout=10
        )
        response.raise_for_status()


def dicomize(slide: Path, folder: Path) -> list[Path]:
    """A 3-level DICOM WSI series of `slide` (0.499 um/px): its tiles copied, not re-encoded."""
    folder.mkdir()
    dataset = folder.parent / "dataset.json"
    dataset.write_text(json.dumps({"ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE"}))
    width, height = 2220, 2967
    # OrthancWSIDicomizer 1.1 takes the imaged width along the image's rows.
    subprocess.run(
        [
            *(DICOMIZER, "--folder", folder, "--dataset", dataset, "--pyramid", "1"),
            *("--levels", "3", "--imaged-width", f"{height * CMU_MPP / 1000}"),
            *("--imaged-height", f"{width * CMU_MPP / 1000}", slide),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return sorted(folder.glob("*.dcm"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("orthanc")
    files = dicomize(CMU, root / "series")
    port = free_port()
    config = {
        "Name": "histosearch-test",
        "HttpPort": port,
        "RemoteAccessAllowed": False,  # binds 127.0.0.1
        "DicomServerEnabled": False,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "config.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(root / "config.json")], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/system", auth=(USER, PASSWORD), timeout=1)
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()}")
                time.sleep(0.1)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        server = Server(port, root / "series", header.StudyInstanceUID, header.SeriesInstanceUID)
        for path in files:
            server.upload(path)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_USER", USER)
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_PASSWORD", PASSWORD)


def index(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`histosearch index ARGS` in-process: (exit status, stdout + stderr)."""
    saved = sys.argv
    sys.argv = ["histosearch", "index", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_dicomweb_series_reads_as_the_same_series_from_files(orthanc: Server, credentials):
    with (
        open_slide(orthanc.slide_url) as remote,
        open_slide(orthanc.series_dir / "wsi-000000.dcm") as local,
    ):
        assert isinstance(remote, DicomWebSlide) and remote.path == orthanc.slide_url
        assert (
            remote.level_dimensions
            == local.level_dimensions
            == (
                (2220, 2967),
                (1110, 1484),
                (555, 742),
            )
        )
        assert remote.mpp == pytest.approx(CMU_MPP) and local.mpp == pytest.approx(CMU_MPP)
        for location in [(0, 0), (900, 1300), (2000, 2800)]:
            assert np.array_equal(
                remote.read_region(location, (224, 224), 5),
                local.read_region(location, (224, 224), 5),
            )
    with open_slide(CMU) as svs:  # the dicomizer copied the SVS's JPEG tiles as they are
        level0 = svs.read_scaled((480, 720), (240, 240), 1.0)
    with open_slide(orthanc.slide_url) as remote:
        assert np.array_equal(remote.read_scaled((480, 720), (240, 240), 1.0), level0)


def test_a_series_folder_is_one_slide_and_manifests_take_urls(orthanc: Server, tmp_path: Path):
    (item,) = collect_items([orthanc.series_dir])
    assert item.paths == [orthanc.series_dir / "wsi-000000.dcm"]
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"path,label\n{orthanc.slide_url},skin\n")
    (item,) = collect_items([manifest])
    assert (item.key, item.name, item.label) == (orthanc.slide_url, orthanc.series, "skin")
    assert parse_dicomweb(item.paths[0]).url == orthanc.slide_url


def test_index_search_and_view_a_dicomweb_slide(
    orthanc: Server, credentials, tmp_path: Path, capsys
):
    archive_dir = tmp_path / "archive"
    local = orthanc.series_dir / "wsi-000000.dcm"
    code, out = index(
        [
            *(orthanc.slide_url, local, "--archive", archive_dir, "--mag", "10"),
            *("--encoder", "color-histogram", "--reduction", "none"),
        ],
        capsys,
    )
    assert code == 0, out
    assert PASSWORD not in out
    with Archive.open(archive_dir) as archive:
        records = {r.path: r for r in archive.slides()}
        assert set(records) == {orthanc.slide_url, str(local.resolve())}
        remote, here = records[orthanc.slide_url], records[str(local.resolve())]
        assert remote.n_patches == here.n_patches > 15
        assert remote.mpp == pytest.approx(CMU_MPP)
        stored_remote, stored_local = archive.read(remote), archive.read(here)
        assert np.array_equal(stored_remote.coords, stored_local.coords)
        np.testing.assert_allclose(stored_remote.features, stored_local.features, atol=1e-3)
        result = Searcher(archive).search(orthanc.slide_url, k=1)
        assert result.query.name == remote.name
        (hit,) = result.slides
        assert hit.record.path == str(local.resolve())
        assert hit.similarity == pytest.approx(1.0, abs=1e-3)
    with TestClient(create_app(archive_dir)) as client:
        listed = {s["id"]: s for s in client.get("/api/slides").json()["slides"]}
        assert listed[remote.id]["viewable"]
        dzi = client.get(f"/slides/{remote.id}.dzi")
        assert dzi.status_code == 200 and 'Width="2220" Height="2967"' in dzi.text
        for address in ["12/3_4", "11/1_2", "8/0_0"]:
            tiles = [client.get(f"/slides/{i}_files/{address}.jpeg") for i in (remote.id, here.id)]
            assert all(t.status_code == 200 for t in tiles)
            pixels = [np.asarray(Image.open(io.BytesIO(t.content))) for t in tiles]
            assert pixels[0].shape == pixels[1].shape and np.array_equal(*pixels)


def test_dicomweb_failures_are_one_line_naming_the_url(
    orthanc: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # no credentials
    with pytest.raises(SlideReadError, match=r"refused access \(HTTP 401\)") as caught:
        open_slide(orthanc.slide_url)
    assert str(caught.value).startswith(orthanc.slide_url)
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_USER", USER)
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(SlideReadError, match="HTTP 401"):
        open_slide(orthanc.slide_url)
    # a token file (Orthanc takes basic auth only: the bearer token is refused)
    token = tmp_path / "token"
    token.write_text("not-a-valid-token\n")
    monkeypatch.delenv("HISTOSEARCH_DICOMWEB_USER")
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_TOKEN_FILE", str(token))
    with pytest.raises(SlideReadError, match="HTTP 401") as caught:
        open_slide(orthanc.slide_url)
    assert "not-a-valid-token" not in str(caught.value)
    monkeypatch.delenv("HISTOSEARCH_DICOMWEB_TOKEN_FILE")
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_USER", USER)
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_PASSWORD", PASSWORD)
    # credentials in the URL are refused, and not repeated
    with pytest.raises(SlideReadError, match="credentials in a URL are refused") as caught:
        open_slide(orthanc.slide_url.replace("://", f"://{USER}:{PASSWORD}@"))
    assert PASSWORD not in str(caught.value)
    # a study that is not there; a series that is not a whole-slide image
    study = f"dicomweb://127.0.0.1:{orthanc.port}/dicom-web/studies/1.2.3.4"
    with pytest.raises(SlideReadError, match="not found on the server"):
        open_slide(study)
    secondary = tmp_path / "secondary.dcm"
    _secondary_capture(secondary, orthanc.study)
    orthanc.upload(secondary)
    header = pydicom.dcmread(secondary)
    not_wsi = orthanc.slide_url.rsplit("/series/", 1)[0] + f"/series/{header.SeriesInstanceUID}"
    with pytest.raises(SlideReadError, match="not a whole-slide image"):
        open_slide(not_wsi)
    # nothing listening; a server that accepts and never answers
    with pytest.raises(SlideReadError, match="connection refused"):
        open_slide(f"dicomweb://127.0.0.1:{free_port()}/dicom-web/studies/1.2.3")
    monkeypatch.setenv("HISTOSEARCH_DICOMWEB_TIMEOUT", "1")
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(SlideReadError, match="did not answer within 1 s"):
            open_slide(f"dicomweb://127.0.0.1:{port}/dicom-web/studies/1.2.3")
        assert time.monotonic() - started < 5


def _secondary_capture(path: Path, study: str) -> None:
    """A small real-pixel DICOM image that is not a whole-slide image, in the same study."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = np.asarray(Image.open(CMU).convert("RGB").resize((64, 64)))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, generate_uid()
    dataset.Modality, dataset.PatientID = "OT", "test"
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 3, "RGB"
    dataset.PlanarConfiguration, dataset.PixelRepresentation = 0, 0
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(path, enforce_file_format=True)


class silent_server:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        return self.sock.getsockname()[1]

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_bench_tiles_the_same_slide_from_files_and_dicomweb(orthanc: Server, credentials):
    local = orthanc.series_dir / "wsi-000000.dcm"
    rates = bench_sources([local, orthanc.slide_url], 10.0, repeats=1)
    assert [r.source for r in rates] == [str(local), orthanc.slide_url]
    assert rates[0].tiles == rates[1].tiles > 15
    assert all(r.tiles_per_s > 0 for r in rates)

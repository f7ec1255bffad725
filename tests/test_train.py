from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from data_paths import IDC, TARGET
from PIL import Image
from typer.testing import CliRunner

from histosearch.cli import app
from histosearch.encoders import create_encoder
from histosearch.stain import ReinhardNormalizer
from histosearch.train.losses import byol_loss, contrastive_loss, ema_update
from histosearch.train.pairs import PairError, sample_spatial_pairs
from histosearch.train.trainer import TrainingError, TrainSettings, load_checkpoint, train

runner = CliRunner()


def test_spatial_pairs_respect_micrometres_counts_and_slides():
    # two slides; coordinates in units of 4 um (IDC's 16:1 downsampled 40x)
    slides = ["p1"] * 4 + ["p2"] * 3
    xy = np.array([[0, 0], [50, 0], [100, 0], [3000, 0], [0, 0], [40, 0], [5000, 0]]) * 4.0
    pairs, labels = sample_spatial_pairs(
        slides, xy, near_um=450, far_um=9000, n_near=1, n_far=5, seed=0
    )
    slide_of = np.array(slides)
    assert (slide_of[pairs[:, 0]] == slide_of[pairs[:, 1]]).all()  # never across slides
    distance = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
    assert (distance[labels == 0] <= 450).all() and (distance[labels == 1] >= 9000).all()
    assert (pairs[:, 0] != pairs[:, 1]).all()
    anchors_near = np.bincount(pairs[labels == 0, 0], minlength=7)
    assert anchors_near.max() == 1  # at most n_near per tile
    # tile 0 of p1 has far partner 3 only; p2's tile 6 is far from both others
    assert sorted(pairs[(labels == 1) & (pairs[:, 0] == 6), 1].tolist()) == [4, 5]


def test_pairs_errors():
    with pytest.raises(PairError, match="finite x, y"):
        sample_spatial_pairs(["a", "a"], np.array([[0, 0], [np.nan, 1]]))
    with pytest.raises(PairError, match="0 near"):
        sample_spatial_pairs(["a", "b"], np.array([[0.0, 0.0], [1.0, 0.0]]), near_um=10, far_um=20)


def test_losses_by_hand():
    f1 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    f2 = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    # similar pair at distance 5 costs 5; dissimilar at 0.5 with margin 1 costs 0.5
    assert contrastive_loss(f1, f2, torch.tensor([0, 1]), margin=1.0).item() == pytest.approx(
        (5 + 0.5) / 2
    )
    assert contrastive_loss(f1, f2, torch.tensor([1, 1]), margin=1.0).item() == pytest.approx(0.25)
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert byol_loss(p, z).item() == pytest.approx((0 + 2) / 2)


def test_ema_update():
    online, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    torch.nn.init.constant_(online.weight, 1.0)
    torch.nn.init.constant_(target.weight, 0.0)
    ema_update(target, online, decay=0.99)
    assert torch.allclose(target.weight, torch.full_like(target.weight, 0.01))
    ema_update(target, online, decay=0.99)
    assert torch.allclose(target.weight, torch.full_like(target.weight, 0.01 * 0.99 + 0.01))


def _idc_subset(tmp: Path, patients: int) -> Path:
    with (IDC / "manifest.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    keep = sorted({r["patient"] for r in rows})[:patients]
    path = tmp / "idc.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row["patient"] in keep:
                writer.writerow({**row, "path": str((IDC / row["path"]).resolve())})
    return path


@pytest.mark.parametrize("method", ["spatial", "byol"])
def test_tiny_training_lowers_the_loss_and_the_checkpoint_is_an_encoder(
    tmp_path: Path, method: str
):
    target = tmp_path / "target.png"
    target.write_bytes(TARGET.read_bytes())
    settings = TrainSettings(
        method=method,
        manifest=str(_idc_subset(tmp_path, 3)),
        stain_target=str(target) if method == "spatial" else None,
        backbone="resnet10t",
        epochs=3,
        image_size=32,
        batch_size=32,
        lr=1e-3,
        coord_mpp=4.0,
        near_um=450,
        far_um=2000,
        pairs_per_epoch=256,
        hidden=64,
        projection=32,
    )
    path = train(settings, tmp_path / "run", workers=0)
    history = load_checkpoint(path)["history"]
    assert len(history) == 3 and history[-1] < history[0]
    target.unlink()  # the checkpoint carries the target's LAB statistics, not its path
    again = replace(settings, epochs=4, stain_lab=None)  # as the command line gives them
    train(again, tmp_path / "run", resume=True, workers=0)  # resumes without the target
    assert len(load_checkpoint(path)["history"]) == 4
    encoder = create_encoder(str(path))
    if method == "spatial":
        tile = np.asarray(Image.open(next((IDC / "images").rglob("*.png"))).convert("RGB"))
        expected = ReinhardNormalizer().fit(np.asarray(Image.open(TARGET).convert("RGB")))
        assert encoder.tile_transform is not None
        np.testing.assert_allclose(encoder.tile_transform(tile), expected.transform(tile), atol=1)
    assert encoder.input_size == 32 and encoder.dim == (128 if method == "spatial" else 512)
    out = encoder(np.zeros((2, 50, 50, 3), np.uint8))
    assert out.shape == (2, encoder.dim) and np.isfinite(out).all()


def test_bad_training_inputs(tmp_path: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "path,label\n" + "".join(f"{p},x\n" for p in sorted((IDC / "images").rglob("*.png"))[:40])
    )
    with pytest.raises(TrainingError, match="need x, y and a slide or patient"):
        train(
            TrainSettings(method="spatial", manifest=str(manifest), coord_mpp=4.0), tmp_path / "a"
        )
    with pytest.raises(TrainingError, match="fewer than one batch"):
        train(TrainSettings(method="byol", manifest=str(manifest), batch_size=64), tmp_path / "b")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    with pytest.raises(Exception, match="not a readable checkpoint"):
        create_encoder(str(bad))


def test_resume_after_kill_and_refuse_another_backbone(tmp_path: Path):
    manifest = _idc_subset(tmp_path, 3)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "histosearch.cli",
        "train",
        "spatial",
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--backbone",
        "resnet10t",
        "--epochs",
        "6",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--coord-mpp",
        "4",
        "--near-um",
        "450",
        "--far-um",
        "2000",
        "--pairs-per-epoch",
        "128",
        "--workers",
        "0",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not checkpoint.exists():
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = load_checkpoint(checkpoint)["epoch"]
    assert 1 <= done_before < 6, "killed midway"
    result = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 6 and len(state["history"]) == 6
    refused = runner.invoke(
        app,
        [
            "train",
            "spatial",
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--backbone",
            "resnet34",
            "--coord-mpp",
            "4",
            "--resume",
        ],
    )
    assert refused.exit_code != 0
    assert "backbone resnet10t (asked resnet34)" in str(refused.exception)


def test_checkpoint_works_in_index_search_eval_and_verify(tmp_path: Path):
    settings = TrainSettings(
        method="spatial",
        manifest=str(_idc_subset(tmp_path, 3)),
        backbone="resnet10t",
        epochs=1,
        image_size=32,
        batch_size=32,
        coord_mpp=4.0,
        near_um=450,
        far_um=2000,
        pairs_per_epoch=64,
    )
    checkpoint = str(train(settings, tmp_path / "run", workers=0))
    manifest = _idc_subset(tmp_path, 4)
    out = tmp_path / "eval"
    fingerprint = create_encoder(checkpoint).fingerprint
    result = runner.invoke(
        app,
        [
            "eval",
            str(manifest),
            "--encoder",
            checkpoint,
            "--out",
            str(out),
            "--pairs",
            "200",
            "--near",
            "100",
            "--far",
            "750",
            "--save-threshold",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "saved in" in result.output
    run = out / "001-checkpoint.pt"  # eval writes each run in its own numbered folder
    metrics = json.loads((run / "metrics.json").read_text())["patch"]["metrics"]
    near_agreement, far_agreement = metrics["label agreement (near/far pairs)"]
    # on IDC, tiles within 400 um share their label more often than tiles 3 mm apart
    assert 0 < far_agreement < near_agreement <= 1
    assert (run / "spatial-agreement.png").is_file()
    threshold = load_checkpoint(Path(checkpoint))["threshold"]
    assert threshold is not None
    # the threshold written into the file does not change the encoder's identity
    assert create_encoder(checkpoint).fingerprint == fingerprint != "builtin"
    rows = list(csv.DictReader(manifest.open()))
    verdict = runner.invoke(
        app, ["verify", rows[0]["path"], rows[1]["path"], "--encoder", checkpoint]
    )
    assert verdict.exit_code == 0 and f"threshold {threshold:.4f}" in verdict.output
    archive = tmp_path / "archive"
    indexed = runner.invoke(
        app,
        [
            "index",
            str(manifest),
            "--archive",
            str(archive),
            "--encoder",
            checkpoint,
            "--group-by",
            "patient",
        ],
    )
    assert indexed.exit_code == 0, indexed.output
    found = runner.invoke(
        app, ["search", rows[0]["patient"], "--archive", str(archive), "-k", "2", "--json"]
    )
    assert found.exit_code == 0, found.output
    assert '"rank": 2' in found.output

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from data_paths import LC, write_manifest
from PIL import Image

from histosearch.encoders import create_encoder
from histosearch.train.lgffem import GRN, LGFFEM, FusionNode, GeM, LGFFEMError, multiscale_backbone
from histosearch.train.trainer import TrainingError, TrainSettings, load_checkpoint, train


@pytest.fixture(scope="module")
def model() -> LGFFEM:
    torch.manual_seed(0)
    return LGFFEM("efficientnet-lite0-imagenet", channels=32, layers=2).eval()


def test_shapes_through_every_node(model: LGFFEM):
    x = torch.randn(2, 3, 128, 128)
    features = model.backbone(x)
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4]  # strides 4, 8, 16, 32
    laterals = [conv(f) for conv, f in zip(model.lateral, features, strict=True)]
    assert all(p.shape[1] == 32 for p in laterals)
    nodes = model.nodes(x)
    assert [tuple(n.shape) for n in nodes] == [
        (2, 32, 32, 32),
        (2, 32, 16, 16),
        (2, 32, 8, 8),
        (2, 32, 4, 4),
    ]
    assert model(x).shape == (2, 4 * 32) and model.out_dim == 128
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen by default


def test_fusion_weights_stay_normalised():
    node = FusionNode([torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity()])
    with torch.no_grad():
        node.weights.copy_(torch.tensor([2.0, -1.0, 6.0]))
    w = node.normalised_weights()
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert w.tolist() == pytest.approx([0.25, 0.0, 0.75], abs=1e-4)
    x = torch.ones(1, 1, 2, 2)
    out = node([x, 5 * x, torch.full((1, 1, 1, 1), 2.0)], (2, 2))  # the last one is resized
    assert torch.allclose(out, torch.full_like(out, 0.25 + 0.75 * 2), atol=1e-3)


def test_gem_against_a_direct_computation():
    x = torch.rand(2, 3, 4, 5) + 0.1
    gem = GeM(p=3.0)
    direct = (x.numpy() ** 3).mean(axis=(2, 3)) ** (1 / 3)
    assert np.allclose(gem(x).detach().numpy(), direct, atol=1e-5)
    assert GeM().p.item() == pytest.approx(4.6) and GeM().p.requires_grad


def test_grn_starts_as_the_identity():
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(GRN(8)(x), x)


def test_backbone_with_too_few_levels(monkeypatch):
    class ThreeLevels:
        feature_info = (1, 2, 3)

    monkeypatch.setattr("histosearch.train.lgffem.timm.create_model", lambda *a, **k: ThreeLevels())
    with pytest.raises(LGFFEMError, match="gives 3 feature levels; LGFFEM needs 4"):
        multiscale_backbone("tiny")


def test_tiny_lgffem_run_lowers_the_loss_and_holds_groups_out(tmp_path: Path):
    settings = TrainSettings(
        method="lgffem",
        manifest=str(write_manifest(tmp_path / "lc.csv", LC, "group", 5)),
        backbone="resnet10t",
        epochs=4,
        image_size=64,
        batch_size=16,
        lr=5e-3,
        channels=16,
        layers=1,
        holdout_fraction=0.34,
    )
    path = train(settings, tmp_path / "run", workers=0)
    checkpoint = load_checkpoint(path)
    assert checkpoint["history"][-1] < checkpoint["history"][0]
    held = list(csv.DictReader((tmp_path / "run" / "heldout.csv").open()))
    trained_groups = 15 - len({r["group"] for r in held})
    assert {r["group"] for r in held} and trained_groups > 0
    encoder = create_encoder(str(path))
    assert encoder.dim == 64 and encoder(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 64)


def test_single_class_is_refused(tmp_path: Path):
    manifest = tmp_path / "one.csv"
    images = sorted((LC / "images" / "lung_n").glob("*.jpeg"))[:20]
    manifest.write_text(
        "path,label,group\n" + "".join(f"{p},lung_n,g{i % 4}\n" for i, p in enumerate(images))
    )
    with pytest.raises(TrainingError, match="at least two labels"):
        train(
            TrainSettings(method="lgffem", manifest=str(manifest), backbone="resnet10t"),
            tmp_path / "o",
        )


def test_gradcam_maps_and_figure(tmp_path: Path):
    from typer.testing import CliRunner

    from histosearch.cli import app
    from histosearch.explain import NODE_NAMES, gradcam

    settings = TrainSettings(
        method="lgffem",
        manifest=str(write_manifest(tmp_path / "lc.csv", LC, "group", 3)),
        backbone="resnet10t",
        epochs=1,
        image_size=64,
        batch_size=16,
        channels=16,
        layers=1,
        holdout_fraction=0.34,
    )
    checkpoint = str(train(settings, tmp_path / "run", workers=0))
    encoder = create_encoder(checkpoint)
    images = sorted((LC / "images" / "lung_aca").glob("*.jpeg"))[:2]
    rgb = np.asarray(Image.open(images[0]).convert("RGB"))
    maps = gradcam(encoder, rgb)
    assert list(maps) == [*NODE_NAMES, "combined"]
    for cam in maps.values():
        assert cam.shape == rgb.shape[:2] and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    # Known answer: tissue on one half, blank glass on the other; the map of the descriptor
    # (its distance from glass) must sit on the tissue. Share of the map on the left half
    # (a map with no positive evidence anywhere, all zero, has none):
    shares: dict[str, list[float]] = {"left": [], "right": []}
    for label in ("lung_aca", "lung_n", "lung_scc"):
        for image in sorted((LC / "images" / label).glob("*.jpeg"))[:2]:
            tissue = np.asarray(Image.open(image).convert("RGB"))
            half = tissue.shape[1] // 2
            for side, blank in (("left", np.s_[:, half:]), ("right", np.s_[:, :half])):
                masked = tissue.copy()
                masked[blank] = 255
                cam = gradcam(encoder, masked)["combined"]
                if cam.sum() > 0:
                    shares[side].append(cam[:, :half].sum() / cam.sum())
    assert len(shares["left"]) >= 4 and len(shares["right"]) >= 4, shares
    assert np.mean(shares["left"]) > 0.7 and np.mean(shares["right"]) < 0.3, shares
    out = tmp_path / "cam.png"
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(images[0]),
            "--encoder",
            checkpoint,
            "--reference",
            str(images[1]),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 20_000
    assert not any(p.requires_grad for p in encoder.model.parameters())  # frozen again


def test_backbone_weights_from_a_local_checkpoint(tmp_path: Path):
    import timm

    from histosearch.encoders import EncoderError

    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "r10t.pth")
    loaded = multiscale_backbone("resnet10t", str(tmp_path / "r10t.pth"))
    assert torch.equal(loaded.state_dict()["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    with pytest.raises(EncoderError, match="checkpoint does not fit"):
        multiscale_backbone("resnet18", str(tmp_path / "r10t.pth"))

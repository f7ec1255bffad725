"""Training runs: settings checked before any work, a checkpoint every epoch, resumable."""

from __future__ import annotations

import csv
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader

from histosearch.errors import HistosearchError
from histosearch.fileio import atomic_path
from histosearch.inputs import read_manifest_rows
from histosearch.stain import ReinhardNormalizer
from histosearch.train import METHODS
from histosearch.train.data import (
    LabelledDataset,
    PairDataset,
    TwoViewDataset,
    byol_augment,
    load_images,
    spatial_augment,
)
from histosearch.train.lgffem import LGFFEM
from histosearch.train.losses import byol_loss, contrastive_loss, ema_update
from histosearch.train.models import IMAGENET_LITE0, BYOLNet, SiameseNet
from histosearch.train.pairs import PAPER_FAR_UM, PAPER_NEAR_UM, sample_spatial_pairs

CHECKPOINT = "checkpoint.pt"
FORMAT = "histosearch-encoder/1"


class TrainingError(HistosearchError):
    """Settings, data or a checkpoint that training cannot use."""


@dataclass
class TrainSettings:
    """Everything a run decides; saved in its checkpoints and compared on resume."""

    method: str
    manifest: str
    backbone: str = "resnet18"
    epochs: int = 5
    image_size: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    # spatial
    coord_mpp: float | None = None
    near_um: float = PAPER_NEAR_UM
    far_um: float = PAPER_FAR_UM
    pairs_per_epoch: int = 8192
    margin: float = 1.0
    out_dim: int = 128
    # BYOL
    projection: int = 512
    hidden: int = 2048
    ema: float = 0.99
    stain_target: str | None = None
    # The target's LAB mean and std (6 numbers): a checkpoint normalises without the file.
    stain_lab: list[float] | None = None
    # LGFFEM (supervised): neck width and depth, Sub-center ArcFace, cosine-annealed AdamW
    channels: int = 512
    layers: int = 3
    backbone_weights: str | None = None
    fine_tune: bool = False
    arcface_margin: float = 17.2
    arcface_scale: float = 64.0
    lr_min: float = 8e-5
    holdout_fraction: float = 0.3
    classes: list[str] = field(default_factory=list)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


def build_model(settings: TrainSettings) -> SiameseNet | BYOLNet | LGFFEM:
    if settings.method == "spatial":
        return SiameseNet(settings.backbone, settings.out_dim)
    if settings.method == "byol":
        return BYOLNet(settings.backbone, settings.projection, settings.hidden)
    if settings.method == "lgffem":
        return LGFFEM(
            settings.backbone,
            settings.channels,
            settings.layers,
            settings.fine_tune,
            settings.backbone_weights,
        )
    raise TrainingError(None, f"unknown method {settings.method!r}; choose {', '.join(METHODS)}")


def _arcface(settings: TrainSettings, dim: int) -> torch.nn.Module:
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    return SubCenterArcFaceLoss(
        num_classes=len(settings.classes),
        embedding_size=dim,
        margin=settings.arcface_margin,
        scale=settings.arcface_scale,
    )


def normalise(batch: torch.Tensor, settings: TrainSettings) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the float input the backbone expects, channels_last."""
    mean = torch.tensor(settings.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(settings.std, device=batch.device).view(1, 3, 1, 1)
    return ((batch.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def _read_manifest(path: Path) -> list[dict[str, str]]:
    rows, _, missing = read_manifest_rows(path)
    if not rows:
        raise TrainingError(path, "lists no images")
    if len(missing) == len(rows):  # else each missing file is left out and named
        raise TrainingError(path, f"none of the {len(rows)} listed files exists, e.g. {missing[0]}")
    return rows


def stain_normaliser(settings: TrainSettings) -> ReinhardNormalizer | None:
    """The run's Reinhard normaliser: from the saved LAB statistics, else fitted on
    `stain_target` (whose statistics are then recorded in the settings)."""
    if settings.stain_lab is None:
        if settings.stain_target is None:
            return None
        from histosearch.slide import open_slide

        with open_slide(settings.stain_target) as target:
            fitted = ReinhardNormalizer().fit(target.read_scaled((0, 0), target.dimensions, 1.0))
        settings.stain_lab = [*map(float, fitted.target_mean), *map(float, fitted.target_std)]
    return ReinhardNormalizer.from_lab_stats(settings.stain_lab[:3], settings.stain_lab[3:])


@dataclass
class TrainData:
    """What an epoch draws from: images, and the pairs or class indices of the method."""

    images: np.ndarray
    pairs: np.ndarray | None = None
    pair_labels: np.ndarray | None = None
    classes: np.ndarray | None = None


def _split_column(rows: list[dict[str, str]]) -> str | None:
    return next((c for c in ("group", "patient", "slide") if c in rows[0]), None)


def _holdout(
    rows: list[dict[str, str]], settings: TrainSettings, manifest: Path, out: Path
) -> list[dict[str, str]]:
    """Keep a seeded fraction of the groups/patients out of training (written to
    `out/heldout.csv` for `eval`); never the same group on both sides. A fraction of 0 holds
    out nothing; any other rounds to at least one group."""
    fraction = settings.holdout_fraction
    if not 0 <= fraction < 1:
        raise TrainingError(manifest, f"--holdout-fraction must be in [0, 1), got {fraction:g}")
    if fraction == 0:
        (out / "heldout.csv").unlink(missing_ok=True)  # a previous run's split no longer holds
        return rows
    column = _split_column(rows)
    if column is None:
        raise TrainingError(manifest, "lgffem needs a group, patient or slide column to hold out")
    values = sorted({r[column] for r in rows})
    if len(values) < 2:
        raise TrainingError(
            manifest, f"one {column} only: nothing to hold out (use --holdout-fraction 0)"
        )
    rng = np.random.default_rng(settings.seed)
    count = min(len(values) - 1, max(1, round(len(values) * fraction)))
    held = set(rng.choice(values, count, replace=False))
    train_rows = [r for r in rows if r[column] not in held]
    test_rows = [r for r in rows if r[column] in held]
    unseen = sorted({r["label"] for r in test_rows} - {r["label"] for r in train_rows})
    if unseen:
        raise TrainingError(manifest, f"held-out labels unseen at training: {', '.join(unseen)}")
    with atomic_path(out / "heldout.csv") as tmp, tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {**r, "path": str((manifest.parent / r["path"]).resolve())} for r in test_rows
        )
    return train_rows


def prepare(settings: TrainSettings, out: Path, failures: list[str] | None = None) -> TrainData:
    """Check the data (and build pairs or classes) before any training. Images that cannot
    be read are left out and named in `failures` (without it, the first one raises)."""
    manifest = Path(settings.manifest)
    rows = _read_manifest(manifest)
    data = TrainData(images=np.empty(0))
    if settings.method == "spatial":
        columns = set(rows[0])
        slide_column = next((c for c in ("slide", "patient") if c in columns), None)
        if slide_column is None or not {"x", "y"} <= columns:
            raise TrainingError(manifest, "spatial pairs need x, y and a slide or patient column")
        if settings.coord_mpp is None:
            raise TrainingError(manifest, "give --coord-mpp: microns per x, y unit (IDC: 4.0)")
    if settings.method == "lgffem":
        if "label" not in rows[0]:
            raise TrainingError(manifest, "lgffem needs a label column")
        labels = sorted({r["label"] for r in rows})
        if len(labels) < 2:
            raise TrainingError(manifest, f"lgffem needs at least two labels, found {labels}")
        rows = _holdout(rows, settings, manifest, out)
        settings.classes = labels
    bad: dict[int, str] | None = None if failures is None else {}
    data.images = load_images(
        [manifest.parent / r["path"] for r in rows],
        settings.image_size,
        stain_normaliser(settings),
        bad,
    )
    if bad:
        failures.extend(bad.values())
        rows = [r for i, r in enumerate(rows) if i not in bad]
    if len(rows) < settings.batch_size:
        raise TrainingError(
            manifest, f"{len(rows)} images is fewer than one batch of {settings.batch_size}"
        )
    if settings.method == "spatial":
        xy = np.array([[float(r["x"]), float(r["y"])] for r in rows]) * settings.coord_mpp
        data.pairs, data.pair_labels = sample_spatial_pairs(
            [r[slide_column] for r in rows],
            xy,
            settings.near_um,
            settings.far_um,
            32,
            32,
            settings.seed,
        )
    if settings.method == "lgffem":
        data.classes = np.array([labels.index(r["label"]) for r in rows])
    return data


def load_checkpoint(path: Path) -> dict:
    """A histosearch training checkpoint, or a clear error."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(path, f"not a readable checkpoint: {error}") from error
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise TrainingError(path, "not a histosearch encoder checkpoint")
    return checkpoint


def _set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(
    settings: TrainSettings,
    out: Path,
    resume: bool = False,
    device: str = "cpu",
    workers: int = 1,
    on_step: Callable[[int, int, float], None] | None = None,
    failures: list[str] | None = None,
) -> Path:
    """Train, writing `out/checkpoint.pt` after every epoch; `resume` continues from it.

    `on_step(epoch, step, loss)` reports progress; unreadable images are skipped and named
    in `failures` when it is given (else the first one stops the run). Returns the
    checkpoint's path.
    """
    if settings.backbone == IMAGENET_LITE0:
        settings.mean, settings.std = [0.5] * 3, [0.5] * 3  # the TF-Lite models' scaling
    else:
        try:
            config = timm.data.resolve_data_config(
                {}, model=timm.create_model(settings.backbone, num_classes=0)
            )
        except Exception as error:
            raise TrainingError(
                None, f"timm cannot build backbone {settings.backbone!r}: {error}"
            ) from error
        settings.mean, settings.std = list(config["mean"]), list(config["std"])
    path = out / CHECKPOINT
    start_epoch, state = 0, None
    if resume and path.exists():
        state = load_checkpoint(path)
        saved = state["settings"]
        different = [
            k
            for k in ("method", "backbone", "image_size", "out_dim")
            if saved.get(k) != asdict(settings)[k]
        ]
        if different:
            raise TrainingError(
                path,
                "made with other settings: "
                + ", ".join(f"{k} {saved[k]} (asked {asdict(settings)[k]})" for k in different),
            )
        start_epoch = state["epoch"]
        # the run goes on with its own stain target, even if the image has moved since
        settings.stain_lab = saved.get("stain_lab")
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(settings, out, failures)
    _set_seed(settings.seed)  # the initial weights depend on --seed alone
    model = build_model(settings).to(device).to(memory_format=torch.channels_last)
    criterion = (
        _arcface(settings, model.out_dim).to(device) if settings.method == "lgffem" else None
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if criterion is not None:
        trainable += list(criterion.parameters())
    optimizer, scheduler = _optimiser(settings, trainable, data)
    history: list[float] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if criterion is not None:
            criterion.load_state_dict(state["criterion"])
        history = list(state["history"])
    for epoch in range(start_epoch, settings.epochs):
        _set_seed(settings.seed * 1000 + epoch)  # an epoch's data and augmentations, resumable
        loader = DataLoader(
            _epoch_dataset(settings, data),
            settings.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
        )
        model.train()
        total, steps = 0.0, 0
        for step, batch in enumerate(loader):
            loss = _batch_loss(settings, model, criterion, batch, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if isinstance(model, BYOLNet):
                ema_update(model.target_backbone, model.backbone, settings.ema)
                ema_update(model.target_projector, model.projector, settings.ema)
            total, steps = total + loss.item(), steps + 1
            if on_step is not None:
                on_step(epoch, step, loss.item())
        history.append(total / max(steps, 1))
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": FORMAT,
                    "settings": asdict(settings),
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": None if scheduler is None else scheduler.state_dict(),
                    "criterion": None if criterion is None else criterion.state_dict(),
                    "history": history,
                    "threshold": None if state is None else state.get("threshold"),
                },
                tmp,
            )
    return path


def _optimiser(
    settings: TrainSettings, parameters: list[torch.nn.Parameter], data: TrainData
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam for the self-supervised methods (Gildenblat & Klaiman); AdamW with cosine
    annealing from lr to lr_min over the whole run for LGFFEM."""
    if settings.method != "lgffem":
        return torch.optim.Adam(parameters, lr=settings.lr), None
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr)
    steps = settings.epochs * (len(data.images) // settings.batch_size)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, max(1, steps), settings.lr_min
    )


def _epoch_dataset(settings: TrainSettings, data: TrainData) -> torch.utils.data.Dataset:
    if settings.method == "spatial":
        assert data.pairs is not None and data.pair_labels is not None
        chosen = np.random.permutation(len(data.pairs))[: settings.pairs_per_epoch]
        augment = spatial_augment(settings.image_size)
        return PairDataset(data.images, data.pairs[chosen], data.pair_labels[chosen], augment)
    if settings.method == "byol":
        return TwoViewDataset(data.images, byol_augment(settings.image_size))
    assert data.classes is not None
    return LabelledDataset(data.images, data.classes, spatial_augment(settings.image_size))


def _batch_loss(
    settings: TrainSettings,
    model: torch.nn.Module,
    criterion: torch.nn.Module | None,
    batch: list[torch.Tensor],
    device: str,
) -> torch.Tensor:
    if settings.method == "lgffem":
        assert criterion is not None
        return criterion(model(normalise(batch[0].to(device), settings)), batch[1].to(device))
    a, b = (normalise(t.to(device), settings) for t in batch[:2])
    if settings.method == "spatial":
        return contrastive_loss(model(a), model(b), batch[2].to(device), settings.margin)
    return byol_loss(model.online(a), model.target(b)) + byol_loss(model.online(b), model.target(a))

"""`histosearch train`, `verify` and `explain`: trained encoders and their use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from histosearch.cli.common import (
    DEFAULT_ENCODER,
    ENCODER_HELP,
    Method,
    console,
    progress,
    report_failures,
)

if TYPE_CHECKING:
    import numpy as np


def train(
    method: Annotated[
        Method,
        typer.Argument(
            help="spatial (Gildenblat & Klaiman), byol (Huang & Chen) or lgffem (Nunez-Fernandez).",
        ),
    ],
    data: Annotated[Path, typer.Option("--data", help="Manifest CSV of the training images.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for checkpoint.pt.")],
    backbone: Annotated[
        str,
        typer.Option(
            "--backbone", help="timm name, or efficientnet-lite0-imagenet to start from ImageNet."
        ),
    ] = "resnet18",
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 5,
    image_size: Annotated[
        int, typer.Option("--image-size", min=16, help="Training input side.")
    ] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 64,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Default 1e-3; lgffem 5e-3 (cosine to 8e-5).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    coord_mpp: Annotated[
        float | None, typer.Option("--coord-mpp", help="spatial: microns per x, y unit.")
    ] = None,
    near_um: Annotated[
        float, typer.Option("--near-um", help="spatial: similar within this.")
    ] = 1792.0,
    far_um: Annotated[
        float, typer.Option("--far-um", help="spatial: dissimilar beyond this.")
    ] = 9408.0,
    pairs_per_epoch: Annotated[int, typer.Option("--pairs-per-epoch", min=1)] = 8192,
    margin: Annotated[float, typer.Option("--margin", help="spatial: contrastive margin.")] = 1.0,
    stain_target: Annotated[
        Path | None, typer.Option("--stain-target", help="Reinhard-normalise to this image.")
    ] = None,
    channels: Annotated[int, typer.Option("--channels", help="lgffem: neck width (C_in).")] = 512,
    layers: Annotated[int, typer.Option("--layers", min=1, help="lgffem: neck layers.")] = 3,
    backbone_weights: Annotated[
        Path | None,
        typer.Option("--backbone-weights", help="lgffem: local backbone checkpoint (ConvNeXt V2)."),
    ] = None,
    fine_tune: Annotated[
        bool, typer.Option("--fine-tune", help="lgffem: train the backbone too.")
    ] = False,
    holdout_fraction: Annotated[
        float, typer.Option("--holdout-fraction", help="lgffem: groups kept for evaluation.")
    ] = 0.3,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt.")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
) -> None:
    """Train an encoder (self-supervised spatial or BYOL, supervised LGFFEM); the checkpoint
    works as --encoder everywhere."""
    from histosearch.train.trainer import TrainSettings, load_checkpoint
    from histosearch.train.trainer import train as run_training

    settings = TrainSettings(
        method=method,
        manifest=str(data),
        backbone=backbone,
        epochs=epochs,
        image_size=image_size,
        batch_size=batch_size,
        lr=lr if lr is not None else (5e-3 if method == "lgffem" else 1e-3),
        channels=channels,
        layers=layers,
        backbone_weights=None if backbone_weights is None else str(backbone_weights),
        fine_tune=fine_tune,
        holdout_fraction=holdout_fraction,
        seed=seed,
        coord_mpp=coord_mpp,
        near_um=near_um,
        far_um=far_um,
        pairs_per_epoch=pairs_per_epoch,
        margin=margin,
        stain_target=None if stain_target is None else str(stain_target),
    )
    from histosearch.embed import default_device

    device = default_device()
    skipped: list[str] = []
    with progress() as bar:
        task = bar.add_task(f"{method} on {device}", total=None)

        def on_step(epoch: int, step: int, loss: float) -> None:
            bar.update(task, description=f"{method} epoch {epoch + 1}/{epochs} loss {loss:.4f}")
            bar.advance(task)

        path = run_training(
            settings,
            out,
            resume=resume,
            device=device,
            workers=workers,
            on_step=on_step,
            failures=skipped,
        )
    history = load_checkpoint(path)["history"]
    console.print(
        f"{path}: {len(history)} epochs, mean loss per epoch "
        + " ".join(f"{value:.4f}" for value in history),
        highlight=False,
    )
    report_failures([(None, message) for message in skipped], None, "images left out")


def verify(
    image_a: Annotated[Path, typer.Argument(help="First image.")],
    image_b: Annotated[Path, typer.Argument(help="Second image.")],
    encoder_name: Annotated[str, typer.Option("--encoder", help=ENCODER_HELP)] = DEFAULT_ENCODER,
    weights: Annotated[Path | None, typer.Option("--weights")] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Default: the one saved with the encoder.")
    ] = None,
) -> None:
    """Same category or not: the cosine similarity of two images against a threshold."""
    from histosearch.embed import ImageDataset, embed_dataset
    from histosearch.encoders import create_encoder
    from histosearch.search.similarity import l2_normalize

    encoder = create_encoder(encoder_name, weights)
    threshold = threshold if threshold is not None else encoder.threshold
    features = l2_normalize(
        embed_dataset(ImageDataset([image_a, image_b], encoder.input_size), encoder, 2, 0)
    )
    cosine = float(features[0] @ features[1])
    if threshold is None:
        console.print(
            f"cosine similarity {cosine:.4f} (no threshold: pass --threshold, or save one "
            "with histosearch eval --save-threshold)"
        )
        return
    decision = "same category" if cosine >= threshold else "different categories"
    console.print(f"cosine similarity {cosine:.4f}, threshold {threshold:.4f}: {decision}")


def explain(
    image: Annotated[Path, typer.Argument(help="The image to explain.")],
    encoder_name: Annotated[str, typer.Option("--encoder", help="An LGFFEM checkpoint.pt.")],
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="A retrieved image: explain their similarity."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="The PNG to write.")] = Path("gradcam.png"),
) -> None:
    """Grad-CAM heatmaps of LGFFEM's outer fusion nodes P1_2..P4_2 and their combination."""
    from histosearch.encoders import create_encoder
    from histosearch.explain import embed_for_cam, gradcam
    from histosearch.slide import open_slide
    from histosearch.viz import save_cam_figure

    encoder = create_encoder(encoder_name)

    def load(path: Path) -> np.ndarray:
        with open_slide(path) as slide:
            return slide.read_scaled((0, 0), slide.dimensions, 1.0)

    query = load(image)
    if reference is None:
        rows = [(image.name, query, gradcam(encoder, query))]
        title = f"Grad-CAM of the {image.name} descriptor"
    else:
        other = load(reference)
        rows = [
            (f"query {image.name}", query, gradcam(encoder, query, embed_for_cam(encoder, other))),
            (
                f"retrieved {reference.name}",
                other,
                gradcam(encoder, other, embed_for_cam(encoder, query)),
            ),
        ]
        title = "Grad-CAM of the query-retrieved similarity"
    save_cam_figure(rows, out, title)
    console.print(f"heatmaps: {out}")

"""Foundation-model encoders: published shapes on the meta device, random weights in each real
checkpoint layout loaded through the path real weights take, the missing-weights message,
`histosearch encoders`, and an archive built, searched and evaluated with one of them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from data_paths import LC, write_manifest
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from histosearch import Archive
from histosearch.cli import app
from histosearch.encoders import EncoderError, create_encoder
from histosearch.encoders.catalog import CATALOG, MODELS
from histosearch.encoders.foundation import ConvStem, build_network, weights_module

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def _no_local_weights(tmp_path_factory, monkeypatch):
    """Nothing found on this machine unless a test puts it there; fingerprints cached aside."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HISTOSEARCH_WEIGHTS", str(home / "weights"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(home / "hub"))


def lc_tiles(n: int = 3) -> np.ndarray:
    """Real 224 px lung patches of three classes."""
    paths = [sorted((LC / "images" / c).glob("*.jpeg"))[0] for c in ("lung_aca", "lung_n")]
    paths += sorted((LC / "images" / "lung_scc").glob("*.jpeg"))[: n - 2]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[:n]])


def reference_input(tiles: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """The model card's preprocessing written out: scale to [0, 1], resize, normalise."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_published_parameter_count_and_output_dim_on_meta(model):
    with torch.device("meta"):
        network = build_network(model)
        out = network(torch.zeros(2, 3, model.input_size, model.input_size))
    count = sum(p.numel() for p in weights_module(network).parameters())
    low, high = model.params_range  # the card's rounding, at least +-1 %
    assert low <= count <= high, f"{model.name}: {count:,} parameters, card says {model.params}"
    assert tuple(out.shape) == (2, model.dim)


def _random_timm(arch: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()


def test_timm_checkpoint_with_a_module_prefix_equals_a_direct_forward(tmp_path: Path):
    model = CATALOG["lunit-vits16"]
    reference = _random_timm("vit_small_patch16_224", img_size=224)
    # a DDP-trained checkpoint: tensors under "state_dict", names under "module."
    file = tmp_path / "lunit.bin"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, file)
    encoder = create_encoder("lunit-vits16", file)
    tiles = lc_tiles()
    with torch.no_grad():
        expected = reference.forward_features(reference_input(tiles, 224, model.mean, model.std))[
            :, 0
        ]
    assert encoder.dim == 384 and encoder.mean == model.mean
    np.testing.assert_allclose(encoder(tiles), expected.numpy(), atol=1e-5)
    assert encoder.fingerprint == hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    # the fingerprint cache answers the second time without hashing
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "histosearch" / "fingerprints.json"
    assert list(json.loads(cache.read_text()).values()) == [
        hashlib.sha256(file.read_bytes()).hexdigest()
    ]


def test_safetensors_folder_and_hub_cache_layout(tmp_path: Path, monkeypatch):
    model = CATALOG["kaiko-vits16"]
    reference = _random_timm("vit_small_patch16_224", img_size=224, dynamic_img_size=True)
    tiles = lc_tiles()
    with torch.no_grad():
        expected = reference.forward_features(reference_input(tiles, 224, model.mean, model.std))[
            :, 0
        ].numpy()
    folder = tmp_path / "download"
    folder.mkdir()
    save_file(reference.state_dict(), folder / "model.safetensors")
    np.testing.assert_allclose(create_encoder("kaiko-vits16", folder)(tiles), expected, atol=1e-5)
    # the Hugging Face cache as `huggingface-cli download` leaves it, found without --weights
    hub = tmp_path / "hub"
    repo = hub / ("models--" + model.hub_repo.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    (folder / "model.safetensors").rename(snapshot / "model.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    encoder = create_encoder("kaiko-vits16")
    np.testing.assert_allclose(encoder(tiles), expected, atol=1e-5)
    with pytest.raises(EncoderError, match=r"not a lunit-vits8 checkpoint: patch_embed\.proj"):
        create_encoder("lunit-vits8", snapshot / "model.safetensors")  # patch 8 vs 16
    with pytest.raises(EncoderError, match=r"not a ctranspath checkpoint.*\d+ missing, e\.g\."):
        create_encoder("ctranspath", snapshot / "model.safetensors")


def test_a_checkpoint_on_another_position_grid_is_resampled(tmp_path: Path):
    """kaiko's ViT-L was published at 518 px; run at 224 px its positions are resampled once,
    as timm's dynamic image size does on every forward."""
    model = CATALOG["kaiko-vits16"]
    reference = _random_timm("vit_small_patch16_224", img_size=448, dynamic_img_size=True)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    encoder = create_encoder("kaiko-vits16", tmp_path / "model.safetensors")
    tiles = lc_tiles(2)
    with torch.no_grad():
        x = reference_input(tiles, 224, model.mean, model.std)
        expected = reference.forward_features(x)[:, 0].numpy()  # dynamic resampling at 224
    np.testing.assert_allclose(encoder(tiles), expected, atol=1e-5)


def test_original_ctranspath_checkpoint_equals_a_direct_forward(tmp_path: Path):
    model = CATALOG["ctranspath"]
    reference = _random_timm("swin_tiny_patch4_window7_224", embed_layer=ConvStem)
    for module in reference.modules():  # non-trivial batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    # ctranspath.pth's layout (timm 0.5): downsampling at the end of a stage, not the start
    old = {}
    for key, value in reference.state_dict().items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        old[key] = value
    old["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)  # buffers the file carries
    torch.save({"model": old}, tmp_path / "ctranspath.pth")
    encoder = create_encoder("ctranspath", tmp_path / "ctranspath.pth")
    tiles = lc_tiles()
    with torch.no_grad():
        x = reference_input(tiles, 224, model.mean, model.std)
        expected = reference.forward_features(x).mean(dim=(1, 2)).numpy()
    assert encoder.dim == 768
    np.testing.assert_allclose(encoder(tiles), expected, atol=1e-5)


def test_transformers_checkpoints_equal_the_transformers_models(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    tiles = lc_tiles(2)
    torch.manual_seed(0)
    cases = {
        # Phikon: ViTModel ViT-B/16 (layer norm eps 1e-12), the class token
        "phikon": transformers.ViTModel(
            transformers.ViTConfig(image_size=224, patch_size=16), add_pooling_layer=True
        ),
        # Hibou-B: DINOv2 with 4 registers, the pooler output (normed class token)
        "hibou-b": transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(
                image_size=224, patch_size=14, num_register_tokens=4, layerscale_value=0.5
            )
        ),
    }
    for name, reference in cases.items():
        model = CATALOG[name]
        reference.eval()
        with torch.no_grad():  # random layer-scale values, so that they are tested
            for key, value in reference.named_parameters():
                if "lambda1" in key or "register_tokens" in key or "cls_token" in key:
                    value.uniform_(-1, 1)
        reference.save_pretrained(tmp_path / name)
        encoder = create_encoder(name, tmp_path / name)
        with torch.no_grad():
            x = reference_input(tiles, 224, model.mean, model.std)
            output = reference(pixel_values=x)
            expected = output.last_hidden_state[:, 0] if name == "phikon" else output.pooler_output
        np.testing.assert_allclose(encoder(tiles), expected.numpy(), atol=2e-4, err_msg=name)


def test_missing_weights_say_where_and_how_to_fetch(tmp_path: Path):
    with pytest.raises(EncoderError) as caught:
        create_encoder("uni")
    message = str(caught.value)
    assert "\n" not in message
    for part in (
        "uni (UNI (Mahmood lab)): weights not found",
        os.environ["HISTOSEARCH_WEIGHTS"],
        "Hugging Face cache",
        "MahmoodLab/UNI",
        "CC-BY-NC-ND-4.0",
        "huggingface-cli login",
        "huggingface-cli download MahmoodLab/UNI --local-dir DIR",
        "--weights DIR",
    ):
        assert part in message
    with pytest.raises(EncoderError, match=r"no such file|weights file not found"):
        create_encoder("virchow2", tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EncoderError, match=r"paige-ai/Virchow2.*huggingface-cli download"):
        create_encoder("virchow2", empty)


def test_encoders_json_lists_every_entry():
    result = runner.invoke(app, ["encoders", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert set(CATALOG) | {"color-histogram", "efficientnet-lite0-imagenet"} <= set(rows)
    uni = rows["uni"]
    assert (uni["dim"], uni["licence"], uni["gated"], uni["hub"]) == (
        1024,
        "CC-BY-NC-ND-4.0",
        True,
        "MahmoodLab/UNI",
    )
    assert uni["weights_found"] is False and os.environ["HISTOSEARCH_WEIGHTS"] in uni["looked_up"]
    assert rows["virchow2"]["dim"] == 2560


def test_archive_built_searched_and_evaluated_with_lunit_from_the_hub_cache(
    tmp_path: Path, monkeypatch
):
    """A fresh process with HF_HOME and HF_HUB_OFFLINE=1 finds the weights in the hub cache
    and indexes with them; search and eval then use the same cache through the CLI."""
    reference = _random_timm("vit_small_patch16_224", img_size=224)
    hf_home = tmp_path / "hf"
    repo = hf_home / "hub" / "models--1aurent--vit_small_patch16_224.lunit_dino"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    save_file(reference.state_dict(), snapshot / "model.safetensors")
    manifest = write_manifest(tmp_path / "lc.csv", LC, "group", 2)
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(SRC),
    }
    env.pop("HF_HUB_CACHE", None)

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "histosearch.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    listed = {r["name"]: r for r in json.loads(cli("encoders", "--json"))}
    assert listed["lunit-vits16"]["weights_found"]
    assert listed["lunit-vits16"]["weights"].endswith("model.safetensors")
    archive = tmp_path / "archive"
    cli("index", str(manifest), "--archive", str(archive), "--encoder", "lunit-vits16")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hf_home / "hub"))
    query = manifest.read_text().splitlines()[1].split(",")[0]
    found = runner.invoke(
        app, ["search", query, "--archive", str(archive), "--encoder", "lunit-vits16"]
    )
    assert found.exit_code == 0, found.output
    assert Path(query).name in found.output  # the indexed patch finds itself
    # the archive records the weights' fingerprint, and refuses a query embedded with others
    fingerprint = hashlib.sha256((snapshot / "model.safetensors").read_bytes()).hexdigest()[:16]
    with Archive.open(archive) as opened:
        assert opened.settings["weights"] == fingerprint
    other = tmp_path / "other.safetensors"
    retrained = {k: v.clone() for k, v in reference.state_dict().items()}
    retrained["cls_token"] += 1  # other weights of the same model
    save_file(retrained, other)
    outside = LC / (LC / "manifest.csv").read_text().splitlines()[-1].split(",")[0]  # embedded
    refused = runner.invoke(
        app, ["search", str(outside), "--archive", str(archive), "--weights", str(other)]
    )
    assert refused.exit_code != 0
    assert f"(archive: {fingerprint})" in str(refused.exception)
    out = tmp_path / "eval"
    command = ["eval", str(manifest), "--encoder", "lunit-vits16", "--out", str(out)]
    result = runner.invoke(app, [*command, "--pairs", "200"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "001-lunit-vits16" / "metrics.json").read_text())
    assert metrics["settings"]["encoder"] == "lunit-vits16"
    assert metrics["settings"]["weights fingerprint"] == fingerprint
    assert 0 < metrics["patch"]["metrics"]["mMV@5"] <= 1
    # the archive's own features evaluate the same way (no encoder run)
    stored = runner.invoke(app, ["eval", "--archive", str(archive), "--out", str(out)])
    assert stored.exit_code == 0, stored.output
    again = json.loads((out / "002-lunit-vits16" / "metrics.json").read_text())
    assert again["settings"]["weights fingerprint"] == "archive"

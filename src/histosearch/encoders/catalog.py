"""What each published pathology foundation model is, as its model card and reference loader
specify it, and where its weights are found on this machine. No torch here: `histosearch
encoders` lists the catalogue without loading a network."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple


class Normalisation(NamedTuple):
    """Per-channel RGB mean and standard deviation of a model's input, in [0, 1]."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = Normalisation(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
OPENAI_CLIP = Normalisation(
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
)
HALF = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
HOPTIMUS = Normalisation(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
HIBOU = Normalisation(mean=(0.7068, 0.5755, 0.722), std=(0.195, 0.2316, 0.1816))
LUNIT = Normalisation(
    mean=(0.70322989, 0.53606487, 0.66096631), std=(0.21716536, 0.26081574, 0.20723464)
)

NON_COMMERCIAL = "CC-BY-NC-ND-4.0"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class FoundationModel:
    """One published encoder.

    `layout` says how the network is built and how its checkpoint is named:
    - "timm": `timm.create_model(arch, **kwargs)`, checkpoint keys as timm names them;
    - "hf-vit" / "hf-dinov2": a transformers ViTModel / Dinov2Model checkpoint, run as the
      equivalent timm `arch` (keys converted when loading, so transformers is not needed);
    - "ctranspath": timm's Swin-T with CTransPath's convolutional stem;
    - "conch": CONCH's CoCa vision tower (timm ViT-B/16 trunk + attentional poolers).
    `pooling`: "cls" (class token after the final norm), "cls+mean" (class token concatenated
    with the mean of the patch tokens, register tokens skipped), "avg" (Swin's average pool),
    "attn" (CONCH's contrastive attentional pooler, before its projection).
    `kwargs` names layers by string ("swiglu_packed", "silu") so this module needs no torch.
    """

    name: str
    title: str
    hub_repo: str
    layout: str
    arch: str
    kwargs: dict[str, object]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    dim: int
    precision: str  # recommended on a GPU
    licence: str
    gated: bool
    params: str  # as published (model card or paper), e.g. "303M", "1.1B"
    files: tuple[str, ...] = HUB_FILES
    notes: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def hub_url(self) -> str:
        return f"https://huggingface.co/{self.hub_repo}"

    @property
    def params_range(self) -> tuple[float, float]:
        """The parameter counts the published figure stands for: its rounding (half a unit
        of its last digit), at least +-1 %."""
        text = self.params
        value = float(text[:-1]) * {"M": 1e6, "B": 1e9}[text[-1]]
        decimals = len(text[:-1].partition(".")[2])
        slack = max(0.5 * 10**-decimals * {"M": 1e6, "B": 1e9}[text[-1]], 0.01 * value)
        return value - slack, value + slack


def _vit(**kwargs: object) -> dict[str, object]:
    return {"num_classes": 0, **kwargs}


MODELS: tuple[FoundationModel, ...] = (
    FoundationModel(
        name="uni",
        title="UNI (Mahmood lab)",
        hub_repo="MahmoodLab/UNI",
        layout="timm",
        arch="vit_large_patch16_224",
        kwargs=_vit(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls",
        dim=1024,
        precision="float16",
        licence=NON_COMMERCIAL,
        gated=True,
        params="303M",
        files=("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        name="uni2-h",
        title="UNI2-h (Mahmood lab)",
        hub_repo="MahmoodLab/UNI2-h",
        layout="timm",
        arch="vit_giant_patch14_224",
        kwargs=_vit(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            mlp_layer="swiglu_packed",
            act_layer="silu",
            reg_tokens=8,
            dynamic_img_size=True,
        ),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls",
        dim=1536,
        precision="bfloat16",
        licence=NON_COMMERCIAL,
        gated=True,
        params="681M",
        files=("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        name="virchow",
        title="Virchow (Paige)",
        hub_repo="paige-ai/Virchow",
        layout="timm",
        arch="vit_huge_patch14_224",
        kwargs=_vit(
            img_size=224,
            init_values=1e-5,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer="swiglu_packed",
            act_layer="silu",
        ),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls+mean",
        dim=2560,
        precision="float16",
        licence="Apache-2.0",
        gated=True,
        params="631.2M",
    ),
    FoundationModel(
        name="virchow2",
        title="Virchow2 (Paige)",
        hub_repo="paige-ai/Virchow2",
        layout="timm",
        arch="vit_huge_patch14_224",
        kwargs=_vit(
            img_size=224,
            init_values=1e-5,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer="swiglu_packed",
            act_layer="silu",
            reg_tokens=4,
        ),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls+mean",
        dim=2560,
        precision="float16",
        licence=NON_COMMERCIAL,
        gated=True,
        params="631.2M",
    ),
    FoundationModel(
        name="h-optimus-0",
        title="H-optimus-0 (Bioptimus)",
        hub_repo="bioptimus/H-optimus-0",
        layout="timm",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_vit(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"),
        input_size=224,
        mean=HOPTIMUS.mean,
        std=HOPTIMUS.std,
        pooling="cls",
        dim=1536,
        precision="float16",
        licence="Apache-2.0",
        gated=True,
        params="1.1B",
    ),
    FoundationModel(
        name="h-optimus-1",
        title="H-optimus-1 (Bioptimus)",
        hub_repo="bioptimus/H-optimus-1",
        layout="timm",
        arch="vit_giant_patch14_reg4_dinov2",
        kwargs=_vit(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"),
        input_size=224,
        mean=HOPTIMUS.mean,
        std=HOPTIMUS.std,
        pooling="cls",
        dim=1536,
        precision="float16",
        licence="Bioptimus academic research only",
        gated=True,
        params="1.1B",
    ),
    FoundationModel(
        name="prov-gigapath",
        title="Prov-GigaPath tile encoder (Providence/Microsoft)",
        hub_repo="prov-gigapath/prov-gigapath",
        layout="timm",
        arch="vit_giant_patch14_dinov2",
        # timm's giant DINOv2 defaults (SwiGLU packed MLP, SiLU) with the card's overrides
        kwargs=_vit(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
        ),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls",
        dim=1536,
        precision="float16",
        licence="Apache-2.0",
        gated=True,
        params="1.13B",
    ),
    FoundationModel(
        name="phikon",
        title="Phikon (Owkin, iBOT ViT-B/16)",
        hub_repo="owkin/phikon",
        layout="hf-vit",
        arch="vit_base_patch16_224",
        kwargs=_vit(img_size=224, layer_norm_eps=1e-12),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls",
        dim=768,
        precision="float32",
        licence="Owkin non-commercial",
        gated=False,
        params="86M",
        files=("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        name="phikon-v2",
        title="Phikon-v2 (Owkin, DINOv2 ViT-L/16)",
        hub_repo="owkin/phikon-v2",
        layout="hf-dinov2",
        arch="vit_large_patch16_224",
        kwargs=_vit(img_size=224, init_values=1e-5),
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="cls",
        dim=1024,
        precision="float32",
        licence="Owkin non-commercial",
        gated=False,
        params="0.3B",
    ),
    FoundationModel(
        name="hibou-b",
        title="Hibou-B (HistAI, DINOv2 ViT-B/14 + 4 registers)",
        hub_repo="histai/hibou-b",
        layout="hf-dinov2",
        arch="vit_base_patch14_reg4_dinov2",
        kwargs=_vit(img_size=224),
        input_size=224,
        mean=HIBOU.mean,
        std=HIBOU.std,
        pooling="cls",
        dim=768,
        precision="float32",
        licence="Apache-2.0",
        gated=False,
        params="86M",
        notes="pooler_output: the class token after the final layer norm",
    ),
    FoundationModel(
        name="hibou-l",
        title="Hibou-L (HistAI, DINOv2 ViT-L/14 + 4 registers)",
        hub_repo="histai/hibou-L",
        layout="hf-dinov2",
        arch="vit_large_patch14_reg4_dinov2",
        kwargs=_vit(img_size=224),
        input_size=224,
        mean=HIBOU.mean,
        std=HIBOU.std,
        pooling="cls",
        dim=1024,
        precision="float32",
        licence="Apache-2.0",
        gated=False,
        params="304M",
        notes="pooler_output: the class token after the final layer norm",
    ),
    *(
        FoundationModel(
            name=f"kaiko-{short}",
            title=f"kaiko.ai {title} (towards large pathology FMs)",
            hub_repo=f"1aurent/{repo or arch}.kaiko_ai_towards_large_pathology_fms",
            layout="timm",
            arch=arch,
            kwargs=_vit(img_size=224, dynamic_img_size=True),
            input_size=224,
            mean=HALF.mean,
            std=HALF.std,
            pooling="cls",
            dim=dim,
            precision="float32",
            licence="kaiko.ai non-commercial",
            gated=False,
            params=params,
        )
        # the ViT-L repository was renamed from ...reg4_dinov2 (518 px position grid, resampled
        # to the 224 px one when loading, as timm's dynamic size would at run time)
        for short, title, arch, repo, dim, params in (
            ("vits16", "ViT-S/16", "vit_small_patch16_224", None, 384, "22M"),
            ("vits8", "ViT-S/8", "vit_small_patch8_224", None, 384, "22M"),
            ("vitb16", "ViT-B/16", "vit_base_patch16_224", None, 768, "86M"),
            ("vitb8", "ViT-B/8", "vit_base_patch8_224", None, 768, "86M"),
            (
                "vitl14",
                "ViT-L/14 + 4 registers",
                "vit_large_patch14_reg4_dinov2",
                "vit_large_patch14_reg4_224",
                1024,
                "304M",
            ),
        )
    ),
    FoundationModel(
        name="midnight",
        title="Midnight-12k (kaiko.ai, DINOv2 ViT-g/14)",
        hub_repo="kaiko-ai/midnight",
        layout="hf-dinov2",
        arch="vit_giant_patch14_dinov2",
        kwargs=_vit(img_size=224, init_values=1e-5),
        input_size=224,
        mean=HALF.mean,
        std=HALF.std,
        pooling="cls+mean",
        dim=3072,
        precision="float16",
        licence="MIT",
        gated=True,
        params="1.14B",
        notes="position embeddings resampled to the 16 x 16 grid of a 224 px input",
    ),
    *(
        FoundationModel(
            name=f"lunit-{short}",
            title=f"Lunit DINO {title}",
            hub_repo=f"1aurent/{arch}.lunit_dino",
            layout="timm",
            arch=arch,
            kwargs=_vit(img_size=224),
            input_size=224,
            mean=LUNIT.mean,
            std=LUNIT.std,
            pooling="cls",
            dim=384,
            precision="float32",
            licence="Lunit non-commercial",
            gated=False,
            params="21.7M",
        )
        for short, title, arch in (
            ("vits8", "ViT-S/8", "vit_small_patch8_224"),
            ("vits16", "ViT-S/16", "vit_small_patch16_224"),
        )
    ),
    FoundationModel(
        name="ctranspath",
        title="CTransPath (Swin-T with a convolutional stem)",
        hub_repo="1aurent/swin_tiny_patch4_window7_224.CTransPath",
        layout="ctranspath",
        arch="swin_tiny_patch4_window7_224",
        kwargs={"num_classes": 0},
        input_size=224,
        mean=IMAGENET.mean,
        std=IMAGENET.std,
        pooling="avg",
        dim=768,
        precision="float32",
        licence="GPL-3.0",
        gated=False,
        params="27.5M",
        files=(*HUB_FILES, "ctranspath.pth", "CHIEF_CTransPath.pth"),
        notes="the original ctranspath.pth (old timm Swin layout) loads as well",
    ),
    FoundationModel(
        name="conch",
        title="CONCH vision tower (Mahmood lab, CoCa ViT-B/16)",
        hub_repo="MahmoodLab/CONCH",
        layout="conch",
        arch="vit_base_patch16_224",
        kwargs={"num_classes": 0, "img_size": 448, "dynamic_img_size": True},
        input_size=448,
        mean=OPENAI_CLIP.mean,
        std=OPENAI_CLIP.std,
        pooling="attn",
        dim=512,
        precision="float32",
        licence=NON_COMMERCIAL,
        gated=True,
        params="90M",
        files=("pytorch_model.bin",),
        notes="encode_image(proj_contrast=False): the contrastive attentional pool, normed",
        extra={"embed_dim": 512, "caption_dim": 768, "heads": 8, "caption_queries": 256},
    ),
)
CATALOG: dict[str, FoundationModel] = {m.name: m for m in MODELS}


@dataclass(frozen=True)
class BuiltinInfo:
    """What `histosearch encoders` says about an encoder that is not a foundation model."""

    name: str
    dim: int
    input_size: int
    licence: str
    weights: str


BUILTINS: tuple[BuiltinInfo, ...] = (
    BuiltinInfo(
        name="color-histogram",
        dim=512,
        input_size=224,
        licence="-",
        weights="none (no learning)",
    ),
    BuiltinInfo(
        name="efficientnet-lite0-imagenet",
        dim=1280,
        input_size=224,
        licence="Apache-2.0",
        weights="packaged (pip package)",
    ),
    BuiltinInfo(
        name="resnet50-imagenet",
        dim=2048,
        input_size=224,
        licence="BSD-3-Clause",
        weights="timm/resnet50.tv_in1k",
    ),
)


def weights_home() -> Path:
    """Folder of per-model weight folders: $HISTOSEARCH_WEIGHTS, else
    ~/.cache/histosearch/weights (`weights_home()/uni/pytorch_model.bin`)."""
    if os.environ.get("HISTOSEARCH_WEIGHTS"):
        return Path(os.environ["HISTOSEARCH_WEIGHTS"])
    return user_cache_dir() / "weights"


def user_cache_dir() -> Path:
    """histosearch's cache folder: $XDG_CACHE_HOME/histosearch or ~/.cache/histosearch."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histosearch"


def checkpoint_in_folder(folder: Path, files: tuple[str, ...]) -> Path | None:
    """The first of `files` in `folder`, or a sharded safetensors index there."""
    for name in (*files, "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    return None


def hub_cache_file(repo_id: str, files: tuple[str, ...]) -> Path | None:
    """A checkpoint of `repo_id` already in the local Hugging Face cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    for name in (*files, "model.safetensors.index.json"):
        found = try_to_load_from_cache(repo_id=repo_id, filename=name)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_cache_dir() -> Path:
    """Where the Hugging Face cache lives on this machine (HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def locate_weights(model: FoundationModel, given: Path | None = None) -> tuple[Path | None, str]:
    """The checkpoint file of `model`: `given` (a file or a folder), else
    `weights_home()/<name>/`, else the local Hugging Face cache. Returns (file or None, where
    it was looked for, as one sentence)."""
    if given is not None:
        if given.is_file():
            return given, f"{given}"
        if given.is_dir():
            found = checkpoint_in_folder(given, model.files)
            return found, f"{given}/ ({', '.join(model.files)})"
        return None, f"{given} (no such file or folder)"
    home = weights_home() / model.name
    found = checkpoint_in_folder(home, model.files) if home.is_dir() else None
    if found is not None:
        return found, str(home)
    found = hub_cache_file(model.hub_repo, model.files)
    where = (
        f"{home}/ and the Hugging Face cache {hub_cache_dir()} for {model.hub_repo} "
        f"({', '.join(model.files)})"
    )
    return found, where


def fetch_instructions(model: FoundationModel) -> str:
    """How to fetch `model`'s weights on a machine that can reach the hub."""
    gate = (
        f"it is gated: accept its terms at {model.hub_url} and run `huggingface-cli login`, then "
        if model.gated
        else "on a machine with internet run "
    )
    return (
        f"Licence {model.licence}; {gate}"
        f"`huggingface-cli download {model.hub_repo} --local-dir DIR`, copy DIR here and pass "
        f"`--weights DIR` (or put it at {weights_home() / model.name})"
    )

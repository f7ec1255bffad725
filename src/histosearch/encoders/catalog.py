"""What each published pathology foundation model is, as its model card and reference loader
specify it, and where its weights are found on this machine. No torch here: `histosearch
encoders` lists the catalogue without loading a network."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

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
        "uni",
        "UNI (Mahmood lab)",
        "MahmoodLab/UNI",
        "timm",
        "vit_large_patch16_224",
        _vit(img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True),
        224,
        *IMAGENET,
        "cls",
        1024,
        "float16",
        NON_COMMERCIAL,
        True,
        "303M",
        ("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        "uni2-h",
        "UNI2-h (Mahmood lab)",
        "MahmoodLab/UNI2-h",
        "timm",
        "vit_giant_patch14_224",
        _vit(
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
        224,
        *IMAGENET,
        "cls",
        1536,
        "bfloat16",
        NON_COMMERCIAL,
        True,
        "681M",
        ("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        "virchow",
        "Virchow (Paige)",
        "paige-ai/Virchow",
        "timm",
        "vit_huge_patch14_224",
        _vit(
            img_size=224,
            init_values=1e-5,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer="swiglu_packed",
            act_layer="silu",
        ),
        224,
        *IMAGENET,
        "cls+mean",
        2560,
        "float16",
        "Apache-2.0",
        True,
        "631.2M",
    ),
    FoundationModel(
        "virchow2",
        "Virchow2 (Paige)",
        "paige-ai/Virchow2",
        "timm",
        "vit_huge_patch14_224",
        _vit(
            img_size=224,
            init_values=1e-5,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            mlp_layer="swiglu_packed",
            act_layer="silu",
            reg_tokens=4,
        ),
        224,
        *IMAGENET,
        "cls+mean",
        2560,
        "float16",
        NON_COMMERCIAL,
        True,
        "631.2M",
    ),
    FoundationModel(
        "h-optimus-0",
        "H-optimus-0 (Bioptimus)",
        "bioptimus/H-optimus-0",
        "timm",
        "vit_giant_patch14_reg4_dinov2",
        _vit(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"),
        224,
        *HOPTIMUS,
        "cls",
        1536,
        "float16",
        "Apache-2.0",
        True,
        "1.1B",
    ),
    FoundationModel(
        "h-optimus-1",
        "H-optimus-1 (Bioptimus)",
        "bioptimus/H-optimus-1",
        "timm",
        "vit_giant_patch14_reg4_dinov2",
        _vit(img_size=224, init_values=1e-5, dynamic_img_size=False, global_pool="token"),
        224,
        *HOPTIMUS,
        "cls",
        1536,
        "float16",
        "Bioptimus academic research only",
        True,
        "1.1B",
    ),
    FoundationModel(
        "prov-gigapath",
        "Prov-GigaPath tile encoder (Providence/Microsoft)",
        "prov-gigapath/prov-gigapath",
        "timm",
        "vit_giant_patch14_dinov2",
        # timm's giant DINOv2 defaults (SwiGLU packed MLP, SiLU) with the card's overrides
        _vit(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
        ),
        224,
        *IMAGENET,
        "cls",
        1536,
        "float16",
        "Apache-2.0",
        True,
        "1.13B",
    ),
    FoundationModel(
        "phikon",
        "Phikon (Owkin, iBOT ViT-B/16)",
        "owkin/phikon",
        "hf-vit",
        "vit_base_patch16_224",
        _vit(img_size=224, layer_norm_eps=1e-12),
        224,
        *IMAGENET,
        "cls",
        768,
        "float32",
        "Owkin non-commercial",
        False,
        "86M",
        ("pytorch_model.bin", "model.safetensors"),
    ),
    FoundationModel(
        "phikon-v2",
        "Phikon-v2 (Owkin, DINOv2 ViT-L/16)",
        "owkin/phikon-v2",
        "hf-dinov2",
        "vit_large_patch16_224",
        _vit(img_size=224, init_values=1e-5),
        224,
        *IMAGENET,
        "cls",
        1024,
        "float32",
        "Owkin non-commercial",
        False,
        "0.3B",
    ),
    FoundationModel(
        "hibou-b",
        "Hibou-B (HistAI, DINOv2 ViT-B/14 + 4 registers)",
        "histai/hibou-b",
        "hf-dinov2",
        "vit_base_patch14_reg4_dinov2",
        _vit(img_size=224),
        224,
        *HIBOU,
        "cls",
        768,
        "float32",
        "Apache-2.0",
        False,
        "86M",
        notes="pooler_output: the class token after the final layer norm",
    ),
    FoundationModel(
        "hibou-l",
        "Hibou-L (HistAI, DINOv2 ViT-L/14 + 4 registers)",
        "histai/hibou-L",
        "hf-dinov2",
        "vit_large_patch14_reg4_dinov2",
        _vit(img_size=224),
        224,
        *HIBOU,
        "cls",
        1024,
        "float32",
        "Apache-2.0",
        False,
        "304M",
        notes="pooler_output: the class token after the final layer norm",
    ),
    *(
        FoundationModel(
            f"kaiko-{short}",
            f"kaiko.ai {title} (towards large pathology FMs)",
            f"1aurent/{repo or arch}.kaiko_ai_towards_large_pathology_fms",
            "timm",
            arch,
            _vit(img_size=224, dynamic_img_size=True),
            224,
            *HALF,
            "cls",
            dim,
            "float32",
            "kaiko.ai non-commercial",
            False,
            params,
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
        "midnight",
        "Midnight-12k (kaiko.ai, DINOv2 ViT-g/14)",
        "kaiko-ai/midnight",
        "hf-dinov2",
        "vit_giant_patch14_dinov2",
        _vit(img_size=224, init_values=1e-5),
        224,
        *HALF,
        "cls+mean",
        3072,
        "float16",
        "MIT",
        True,
        "1.14B",
        notes="position embeddings resampled to the 16 x 16 grid of a 224 px input",
    ),
    *(
        FoundationModel(
            f"lunit-{short}",
            f"Lunit DINO {title}",
            f"1aurent/{arch}.lunit_dino",
            "timm",
            arch,
            _vit(img_size=224),
            224,
            *LUNIT,
            "cls",
            384,
            "float32",
            "Lunit non-commercial",
            False,
            "21.7M",
        )
        for short, title, arch in (
            ("vits8", "ViT-S/8", "vit_small_patch8_224"),
            ("vits16", "ViT-S/16", "vit_small_patch16_224"),
        )
    ),
    FoundationModel(
        "ctranspath",
        "CTransPath (Swin-T with a convolutional stem)",
        "1aurent/swin_tiny_patch4_window7_224.CTransPath",
        "ctranspath",
        "swin_tiny_patch4_window7_224",
        {"num_classes": 0},
        224,
        *IMAGENET,
        "avg",
        768,
        "float32",
        "GPL-3.0",
        False,
        "27.5M",
        (*HUB_FILES, "ctranspath.pth", "CHIEF_CTransPath.pth"),
        notes="the original ctranspath.pth (old timm Swin layout) loads as well",
    ),
    FoundationModel(
        "conch",
        "CONCH vision tower (Mahmood lab, CoCa ViT-B/16)",
        "MahmoodLab/CONCH",
        "conch",
        "vit_base_patch16_224",
        {"num_classes": 0, "img_size": 448, "dynamic_img_size": True},
        448,
        *OPENAI_CLIP,
        "attn",
        512,
        "float32",
        NON_COMMERCIAL,
        True,
        "90M",
        ("pytorch_model.bin",),
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
    BuiltinInfo("color-histogram", 512, 224, "-", "none (no learning)"),
    BuiltinInfo("efficientnet-lite0-imagenet", 1280, 224, "Apache-2.0", "packaged (pip package)"),
    BuiltinInfo("resnet50-imagenet", 2048, 224, "BSD-3-Clause", "timm/resnet50.tv_in1k"),
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

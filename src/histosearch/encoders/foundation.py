"""Pathology foundation models built in their published layout and loaded from local weights.

Every catalogue entry (`catalog.MODELS`) is registered as an encoder: `create_encoder("uni",
weights=DIR)`. The network is built by timm (or, for CTransPath and CONCH, from timm parts in
the published module layout); transformers checkpoints (Phikon, Hibou, Midnight) are converted
to the equivalent timm ViT when loading, so transformers itself is never needed.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import timm
import torch
from torch import nn

from histosearch.encoders.catalog import (
    CATALOG,
    FoundationModel,
    fetch_instructions,
    locate_weights,
)
from histosearch.encoders.fingerprint import weights_fingerprint
from histosearch.encoders.registry import Encoder, EncoderError, register_encoder
from histosearch.encoders.timm_models import load_state_dict

# Keys a checkpoint may carry that the embedding never uses.
UNUSED = re.compile(
    r"^(head\.|fc_norm\.|pooler\.|classifier\.|mask_token$|embeddings\.mask_token$)"
    r"|relative_position_index$|attn_mask$"
)


class TokenPooling(nn.Module):
    """A timm backbone and the output its model card prescribes."""

    def __init__(self, trunk: nn.Module, pooling: str) -> None:
        super().__init__()
        self.trunk, self.pooling = trunk, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk.forward_features(x)
        if self.pooling == "avg":  # Swin: (B, H, W, C) after the final norm
            return features.mean(dim=(1, 2))
        cls = features[:, 0]
        if self.pooling == "cls":
            return cls
        # the class token with the mean of the patch tokens, register tokens left out
        patches = features[:, self.trunk.num_prefix_tokens :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv-BN-ReLU and a 1x1 conv, in place of
    Swin's 4x4 patchify (channels embed_dim/8, /4, then embed_dim)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = None,
        output_fmt: str = "NHWC",
        **_: object,  # timm passes strict_img_size, device, dtype
    ) -> None:
        super().__init__()
        size = tuple(img_size) if isinstance(img_size, tuple | list) else (img_size, img_size)
        if patch_size not in (4, (4, 4)) or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler: learned queries attend to the layer-normed tokens."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, d_model))
        self.attn = nn.MultiheadAttention(
            d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True
        )
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_k(x)
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.attn(q, x, x, need_weights=False)[0]


class ConchVision(nn.Module):
    """CONCH's vision tower in its checkpoint layout (`visual.*`): a timm ViT-B/16 trunk at
    448 px, a one-query contrastive pooler with its norm and projection, and the 256-query
    captioning pooler. The embedding is `encode_image(proj_contrast=False, normalize=False)`:
    the normed contrastive pool, 512-d (projection and captioning pooler are loaded, unused)."""

    def __init__(self, model: FoundationModel) -> None:
        super().__init__()
        dim, caption = int(model.extra["embed_dim"]), int(model.extra["caption_dim"])
        heads, queries = int(model.extra["heads"]), int(model.extra["caption_queries"])
        self.trunk = timm.create_model(model.arch, pretrained=False, **model.kwargs)
        width = self.trunk.num_features
        self.attn_pool_contrast = AttentionalPooler(dim, width, heads, 1)
        self.ln_contrast = nn.LayerNorm(dim)
        self.proj_contrast = nn.Parameter(torch.zeros(dim, dim))
        self.attn_pool_caption = AttentionalPooler(caption, width, heads, queries)
        self.ln_caption = nn.LayerNorm(caption)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def _timm_kwargs(model: FoundationModel) -> dict[str, object]:
    """The catalogue's construction arguments with layer names resolved to classes."""
    kwargs = dict(model.kwargs)
    if kwargs.get("mlp_layer") == "swiglu_packed":
        kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
    if kwargs.get("act_layer") == "silu":
        kwargs["act_layer"] = nn.SiLU
    if "layer_norm_eps" in kwargs:  # transformers' ViT normalises with eps 1e-12
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=kwargs.pop("layer_norm_eps"))
    return kwargs


def build_network(model: FoundationModel) -> nn.Module:
    """The model's network with random weights (build under `torch.device("meta")` for its
    shape alone). Its `weights_module()` is the part the checkpoint fills."""
    if model.layout == "conch":
        return ConchVision(model)
    kwargs = _timm_kwargs(model)
    if model.layout == "ctranspath":
        kwargs["embed_layer"] = ConvStem
    trunk = timm.create_model(model.arch, pretrained=False, **kwargs)
    return TokenPooling(trunk, model.pooling)


def weights_module(network: nn.Module) -> nn.Module:
    """The module whose state dict a checkpoint of the model holds."""
    return network.trunk if isinstance(network, TokenPooling) else network


def hf_to_timm(state: dict[str, torch.Tensor], prefix_tokens_in_pos: bool) -> dict:
    """A transformers ViTModel / Dinov2Model(+registers) state dict in timm's names.

    `prefix_tokens_in_pos` False (timm's `no_embed_class`, as in timm's register models):
    transformers adds the class token's position before the registers join, so that position
    is folded into the class token and only the patch positions are kept.
    """
    out: dict[str, torch.Tensor] = {}
    renames = (
        ("attention.output.dense", "attn.proj"),
        ("layernorm_before", "norm1"),
        ("layernorm_after", "norm2"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
        ("mlp.weights_in", "mlp.fc1"),
        ("mlp.weights_out", "mlp.fc2"),
        ("layer_scale1.lambda1", "ls1.gamma"),
        ("layer_scale2.lambda1", "ls2.gamma"),
    )
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        block = re.match(r"encoder\.layer\.(\d+)\.(.+)", key)
        if block is None:
            name = {
                "embeddings.cls_token": "cls_token",
                "embeddings.register_tokens": "reg_token",
                "embeddings.position_embeddings": "pos_embed",
                "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
                "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
                "layernorm.weight": "norm.weight",
                "layernorm.bias": "norm.bias",
            }.get(key, key)
            out[name] = value
            continue
        index, rest = block.groups()
        part = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
        if part is not None:
            qkv.setdefault(f"blocks.{index}.attn.qkv.{part[2]}", {})[part[1]] = value
            continue
        for old, new in renames:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[f"blocks.{index}.{rest}"] = value
    for name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise KeyError(f"{name}: incomplete query/key/value")
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])
    if not prefix_tokens_in_pos and "pos_embed" in out and "cls_token" in out:
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _prefixes(keys: list[str]) -> list[str]:
    """ "" and every leading one- or two-part dotted prefix of the keys (`module.`,
    `model.backbone.`, `visual.`...), the candidates a wrapper may have added."""
    found = {""}
    for key in keys:
        parts = key.split(".")
        for depth in (1, 2):
            if len(parts) > depth:
                found.add(".".join(parts[:depth]) + ".")
    return sorted(found, key=len)


def match_checkpoint(
    model: FoundationModel, network: nn.Module, state: dict[str, torch.Tensor], path: Path
) -> dict[str, torch.Tensor]:
    """`state` renamed to `network`'s checkpoint module: the key prefix a wrapper added
    (`module.`, `model.`, `backbone.`, `encoder.`, `visual.`...) is found by which one makes
    the keys fit, transformers names are converted; any missing key, or one left over that
    the embedding does not ignore, is an error naming keys."""
    target = weights_module(network)
    expected = target.state_dict()
    best: tuple[int, str, dict[str, torch.Tensor]] = (-1, "", {})
    for prefix in _prefixes(list(state)):
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if model.layout.startswith("hf-"):
            try:
                inner = hf_to_timm(inner, not getattr(target, "no_embed_class", False))
            except KeyError:
                continue
        elif model.layout == "ctranspath":
            from timm.models.swin_transformer import checkpoint_filter_fn

            try:  # renames the original (timm 0.5) layout; fails on what is no Swin at all
                inner = checkpoint_filter_fn(inner, target)
            except (AttributeError, KeyError, RuntimeError, ValueError):
                continue
        hits = sum(k in expected for k in inner)
        if hits > best[0]:
            best = (hits, prefix, inner)
    _, prefix, inner = best
    # batch-norm step counters are bookkeeping some exports drop
    missing = sorted(k for k in expected if k not in inner and "num_batches_tracked" not in k)
    unexpected = sorted(k for k in inner if k not in expected and not UNUSED.search(k))
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {', '.join(missing[:4])}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:4])}")
        raise EncoderError(
            path,
            f"not a {model.name} checkpoint ({model.hub_repo}); after removing the prefix "
            f"{prefix!r}: {'; '.join(detail)}. {fetch_instructions(model)}",
        )
    inner = {k: v for k, v in inner.items() if k in expected}
    inner |= {k: v for k, v in expected.items() if k not in inner}  # the step counters
    pos = inner.get("pos_embed")
    if pos is not None and pos.shape != expected["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix_tokens = 0 if getattr(target, "no_embed_class", False) else 1
        inner["pos_embed"] = resample_abs_pos_embed(
            pos, list(target.patch_embed.grid_size), num_prefix_tokens=prefix_tokens
        )
    for key, value in inner.items():
        if value.shape != expected[key].shape:
            raise EncoderError(
                path,
                f"not a {model.name} checkpoint: {key} has shape {tuple(value.shape)}, "
                f"the model {tuple(expected[key].shape)}. {fetch_instructions(model)}",
            )
    return inner


def checkpoint_tensors(path: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """The tensors of a checkpoint file, or of every shard a safetensors index names."""
    if path.name.endswith(".index.json"):
        import json

        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        files = [path.parent / shard for shard in shards]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state |= load_state_dict(file)
        return state, files
    return load_state_dict(path), [path]


def load_foundation(model: FoundationModel, weights: Path | None) -> Encoder:
    """The model from local weights only (`weights`: a file or folder; else the weights home
    or the Hugging Face cache); one message says where it looked and how to fetch them."""
    found, where = locate_weights(model, weights)
    if found is None:
        raise EncoderError(
            None,
            f"{model.name} ({model.title}): weights not found; looked in {where}. "
            + fetch_instructions(model),
        )
    state, files = checkpoint_tensors(found)
    network = build_network(model)
    weights_module(network).load_state_dict(match_checkpoint(model, network, state, found))
    return foundation_encoder(model, network, weights_fingerprint(files))


def foundation_encoder(model: FoundationModel, network: nn.Module, fingerprint: str) -> Encoder:
    """Wrap a built network with its model card's preprocessing."""
    return Encoder(
        name=model.name,
        model=network,
        dim=model.dim,
        input_size=model.input_size,
        mean=model.mean,
        std=model.std,
        fingerprint=fingerprint,
        precision=model.precision,
    )


def random_encoder(name: str, seed: int = 0) -> Encoder:
    """A catalogue model with random weights in its real layout (throughput only)."""
    torch.manual_seed(seed)
    model = CATALOG[name]
    encoder = foundation_encoder(model, build_network(model), "random")
    encoder.model.eval().requires_grad_(False)
    return encoder


def _register(model: FoundationModel) -> None:
    register_encoder(model.name)(lambda weights: load_foundation(model, weights))


for _model in CATALOG.values():
    _register(_model)

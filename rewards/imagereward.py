"""ImageReward (Xu et al. 2023) on transformers' BLIP classes.

The `image-reward` package cannot be imported with transformers 5 (and pins timm 0.6.13,
which pulls torchvision), so we rebuild its model: BLIP ViT (`BlipVisionModel`) -> BERT with
cross-attention to the image (`BlipTextModel`, the same layout as BLIP's `med.py`) -> the
[CLS] feature -> a linear head, normalised by the official mean/std.

Official `ImageReward.pt` keys -> ours:
| official                                        | ours                                          |
|-------------------------------------------------|-----------------------------------------------|
| blip.visual_encoder.cls_token `[1,1,W]`         | visual_encoder.embeddings.class_embedding     |
| blip.visual_encoder.pos_embed `[1,N+1,W]`       | visual_encoder.embeddings.position_embedding  |
| blip.visual_encoder.patch_embed.proj.*          | visual_encoder.embeddings.patch_embedding.*   |
| blip.visual_encoder.blocks.i.norm1 / norm2      | visual_encoder.encoder.layers.i.layer_norm1/2 |
| blip.visual_encoder.blocks.i.attn.qkv / proj    | ....layers.i.self_attn.qkv / projection       |
| blip.visual_encoder.blocks.i.mlp.fc1 / fc2      | ....layers.i.mlp.fc1 / fc2                    |
| blip.visual_encoder.norm                        | visual_encoder.post_layernorm                 |
| blip.text_encoder.*                             | text_encoder.* (same names)                   |
| mlp.layers.{0,2,4,6,7}.*                        | mlp.layers.{0,2,4,6,7}.*                      |
| blip.vision_proj.*, blip.text_proj.*, blip.text_encoder.embeddings.position_ids | dropped: unused by the score |
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from rewards.checkpoint import (
    load_strict,
    read_state_dict,
    reject_unmapped,
    require_keys,
)
from rewards.files import FileSpec
from rewards.mlp_head import LinearStack, linear_stack_from_state_dict
from rewards.preprocess import clip_preprocess
from rewards.tokenizers import load_tokenizer

# From the official ImageReward.py: score = (mlp(feature) - MEAN) / STD; prompts padded to 35 tokens.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
# BLIP's ViT (base and large) uses 64-wide heads and LayerNorm eps 1e-6; not stored in the weights.
VISION_HEAD_WIDTH = 64
VISION_LN_EPS = 1e-6

FILES = (
    FileSpec("imagereward", "file", "ImageReward.pt from THUDM/ImageReward on the Hugging Face hub",
             filename="ImageReward.pt"),
    FileSpec("imagereward_med_config", "file", "med_config.json from THUDM/ImageReward on the Hugging Face hub",
             filename="med_config.json", default_from="imagereward"),
    FileSpec("imagereward_tokenizer", "dir", "a bert-base-uncased tokenizer directory (vocab.txt)"),
)
WHAT = "the official ImageReward.pt (THUDM/ImageReward)"

_REQUIRED = (
    "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.pos_embed",
    "blip.visual_encoder.cls_token", "blip.text_encoder.embeddings.word_embeddings.weight",
    "mlp.layers.0.weight",
)
_DROPPED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")
_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$")
_VIT_PARTS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def map_imagereward_keys(state_dict: dict[str, torch.Tensor], *, path: Path) -> dict[str, torch.Tensor]:
    """Official `ImageReward.pt` keys -> `ImageRewardModel` keys (table above); unknown keys are an error."""
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if _DROPPED.match(key):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            block = _VIT_BLOCK.match(rest)
            if rest in _VIT_TOP:
                out["visual_encoder." + _VIT_TOP[rest]] = value
            elif block:
                i, part, param = block.groups()
                out[f"visual_encoder.encoder.layers.{i}.{_VIT_PARTS[part]}.{param}"] = value
            else:
                unmapped.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
        else:
            unmapped.append(key)
    reject_unmapped(unmapped, path=path, what=WHAT)
    return out


def _vision_config(state_dict: dict[str, torch.Tensor], *, path: Path):
    from transformers import BlipVisionConfig

    proj = state_dict["blip.visual_encoder.patch_embed.proj.weight"]  # [W, 3, p, p]
    width, patch = proj.shape[0], proj.shape[-1]
    n_pos = state_dict["blip.visual_encoder.pos_embed"].shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{path}: blip.visual_encoder.pos_embed has {n_pos} positions, not 1 + a square grid")
    depth = len([k for k in state_dict if re.match(r"^blip\.visual_encoder\.blocks\.\d+\.norm1\.weight$", k)])
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=state_dict["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=max(1, width // VISION_HEAD_WIDTH),
        image_size=grid * patch, patch_size=patch, hidden_act="gelu", layer_norm_eps=VISION_LN_EPS,
    )


def _text_config(med_config: Path, *, encoder_width: int):
    from transformers import BlipTextConfig

    try:
        med = json.loads(med_config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{med_config} is not JSON; provide med_config.json from THUDM/ImageReward") from err
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in needed if k not in med]
    if missing:
        raise ValueError(f"{med_config} lacks {missing}; provide med_config.json from THUDM/ImageReward")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
        max_position_embeddings=med.get("max_position_embeddings", 512),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None,
        encoder_hidden_size=encoder_width,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally
    )


class ImageRewardModel(nn.Module):
    """`[B,3,S,S]` normalised pixels + token ids `[B,L]` -> normalised ImageReward `[B]`."""

    def __init__(self, vision_config, text_config, head: LinearStack):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual_encoder = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = head

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state  # [B, N+1, W]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, is_decoder=False,
        ).last_hidden_state
        reward = self.mlp(text[:, 0, :].float()).squeeze(-1)  # [B]
        return (reward - SCORE_MEAN) / SCORE_STD


class ImageRewardScorer(nn.Module):
    """ImageReward on tensors: `[B,3,H,W]` in [0,1] + B prompts -> `[B]` (differentiable)."""

    name = "imagereward"
    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(model.visual_encoder.config.image_size)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        param = next(self.model.parameters())
        pixels = clip_preprocess(images.to(param.device), self.image_size, dtype=param.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                return_tensors="pt").to(param.device)
        return self.model(pixels, tokens.input_ids, tokens.attention_mask)


def load_imagereward_model(checkpoint: Path, med_config: Path) -> ImageRewardModel:
    """Build the model from the official files and load it strictly (CPU, float32)."""
    state_dict = read_state_dict(checkpoint, what=WHAT)
    require_keys(state_dict, _REQUIRED, path=checkpoint, what=WHAT)
    mapped = map_imagereward_keys(state_dict, path=checkpoint)
    head = linear_stack_from_state_dict(
        {k[len("mlp."):]: v for k, v in mapped.items() if k.startswith("mlp.")}, path=checkpoint,
        what=WHAT + " (mlp.layers.*)",
    )
    vision = _vision_config(state_dict, path=checkpoint)
    model = ImageRewardModel(vision, _text_config(med_config, encoder_width=vision.hidden_size), head)
    load_strict(model, mapped, path=checkpoint, what=WHAT + f" with {med_config.name}")
    return model


def build_imagereward(*, paths: Mapping[str, str] | None, device, dtype: torch.dtype) -> ImageRewardScorer:
    """ImageReward-v1.0 from `ImageReward.pt`, `med_config.json` and a BERT tokenizer directory."""
    ckpt_spec, med_spec, tok_spec = FILES
    checkpoint, med_config, tok_dir = ckpt_spec.resolve(paths), med_spec.resolve(paths), tok_spec.resolve(paths)
    model = load_imagereward_model(checkpoint, med_config)
    vocab = model.text_encoder.config.vocab_size
    tokenizer = load_tokenizer(tok_dir, kind="bert", key=tok_spec.key, what=tok_spec.what, vocab_size=vocab)
    # As BLIP's init_tokenizer: two extra tokens (ids 30522, 30523 in bert-base-uncased -> vocab 30524).
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {tok_dir} has {len(tokenizer)} tokens with [DEC]/[ENC] but "
                         f"{med_config} embeds {vocab}: provide {tok_spec.what}")
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.mlp.float()  # the head runs in float32 as in the official code
    return ImageRewardScorer(model, tokenizer)

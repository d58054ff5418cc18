"""CLIP-family scorers on transformers' `CLIPModel`: the shared image/text similarity,
CLIP score and PickScore (both plain `CLIPModel` directories), and the loaders they share
with HPSv2 (`rewards.hps`) and the LAION aesthetic predictor (`rewards.aesthetic`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from rewards.files import FileSpec
from rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess
from rewards.tokenizers import load_tokenizer


def load_clip_dir(path: Path, *, key: str, what: str, device: str | torch.device, dtype: torch.dtype):
    """Load a `CLIPModel` saved with `save_pretrained`, frozen and in eval mode.

    Fails when the directory is not a CLIP model or when weights are missing/unexpected.
    """
    from transformers import CLIPModel

    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} has no config.json: {key!r} must be a transformers CLIPModel directory "
            f"(config.json + model.safetensors); provide {what}"
        )
    try:
        model, info = CLIPModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    except Exception as err:
        raise ValueError(f"could not load a CLIPModel from {path} ({err}); provide {what}") from err
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path} does not match its CLIPModel config: {bad}; provide {what}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def processor_stats(path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std from a `preprocessor_config.json` next to the model, else CLIP's."""
    config = path / "preprocessor_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return tuple(data.get("image_mean", CLIP_MEAN)), tuple(data.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def clip_image_embeds(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[B,3,S,S]` normalised pixels -> `[B,E]` projected image embeddings (not normalised)."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return clip.visual_projection(pooled)


def clip_text_embeds(clip, input_ids: torch.Tensor) -> torch.Tensor:
    """`[B,L]` token ids -> `[B,E]` projected text embeddings, pooled at the first EOS token."""
    pooled = clip.text_model(input_ids=input_ids).pooler_output
    return clip.text_projection(pooled)


class ClipSimilarity(nn.Module):
    """`scale * cos(image_embed, text_embed)`, `[B,3,H,W]` + B prompts -> `[B]`.

    scale: a number (CLIP score uses 100, HPSv2 uses 1) or None for the model's
    `logit_scale.exp()` (PickScore). The text runs causally and is pooled at its EOS token,
    so padding never changes a score and batch size does not either. letterbox: fit the longer
    side and zero-pad instead of cropping the shorter one (HPSv2's eval transform).
    """

    differentiable = True

    def __init__(self, clip, tokenizer, *, name: str, scale: float | None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, letterbox: bool = False):
        super().__init__()
        self.name = name
        self.clip = clip
        self.tokenizer = tokenizer
        self.scale = scale
        self.mean, self.std = tuple(mean), tuple(std)
        self.letterbox = letterbox
        self.image_size = int(clip.config.vision_config.image_size)
        self.max_length = int(clip.config.text_config.max_position_embeddings)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        param = next(self.clip.parameters())
        pixels = clip_preprocess(images.to(param.device), self.image_size, mean=self.mean, std=self.std,
                                 dtype=param.dtype, letterbox=self.letterbox)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").input_ids.to(param.device)
        image = nn.functional.normalize(clip_image_embeds(self.clip, pixels).float(), dim=-1)
        text = nn.functional.normalize(clip_text_embeds(self.clip, ids).float(), dim=-1)
        scale = self.clip.logit_scale.exp().float() if self.scale is None else self.scale
        return scale * (image * text).sum(-1)


def _clip_dir_scorer(name: str, model_spec: FileSpec, tok_spec: FileSpec, *, scale: float | None,
                     paths: Mapping[str, str] | None, device, dtype) -> ClipSimilarity:
    model_dir = model_spec.resolve(paths)
    clip = load_clip_dir(model_dir, key=model_spec.key, what=model_spec.what, device=device, dtype=dtype)
    tokenizer = load_tokenizer(tok_spec.resolve(paths), kind="clip", key=tok_spec.key, what=tok_spec.what,
                               vocab_size=clip.config.text_config.vocab_size)
    mean, std = processor_stats(model_dir)
    return ClipSimilarity(clip, tokenizer, name=name, scale=scale, mean=mean, std=std)


PICKSCORE_FILES = (
    FileSpec("pickscore", "dir", "the PickScore_v1 CLIPModel directory (yuvalkirstain/PickScore_v1)"),
    FileSpec("pickscore_tokenizer", "dir",
             "a CLIP tokenizer directory (vocab.json+merges.txt), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
             default_from="pickscore"),
)
CLIP_SCORE_FILES = (
    FileSpec("clip_score", "dir", "a CLIPModel directory, e.g. openai/clip-vit-large-patch14"),
    FileSpec("clip_score_tokenizer", "dir", "the CLIP tokenizer directory of that model",
             default_from="clip_score"),
)


def build_pickscore(*, paths: Mapping[str, str] | None, device, dtype) -> ClipSimilarity:
    """PickScore: `logit_scale.exp() * cos(image, text)` (Kirstain et al. 2023)."""
    return _clip_dir_scorer("pickscore", *PICKSCORE_FILES, scale=None, paths=paths, device=device, dtype=dtype)


def build_clip_score(*, paths: Mapping[str, str] | None, device, dtype) -> ClipSimilarity:
    """CLIP score: `100 * cos(image, text)` (Hessel et al. 2021, without the clamp at 0 so it stays smooth)."""
    return _clip_dir_scorer("clip_score", *CLIP_SCORE_FILES, scale=100.0, paths=paths, device=device, dtype=dtype)

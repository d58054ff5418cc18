"""HPSv2 / HPSv2.1 (Wu et al. 2023): an OpenCLIP ViT-H-14 fine-tuned on human preferences.

The official `HPS_v2_compressed.pt` / `HPS_v2.1_compressed.pt` hold `{"state_dict": <OpenCLIP
CLIP state dict>}`; we map it onto transformers' `CLIPModel` (`rewards.openclip`) since
open_clip needs torchvision. Score: `cos(image_features, text_features)`, as `hpsv2.score`,
with HPSv2's eval transform (open_clip `ResizeMaxSize` via `light_augmentation=True`): the
longer side resized to 224 (bicubic), the shorter side zero-padded to a square (black, before
the CLIP normalisation), not the resize-and-center-crop of other CLIP scorers.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from rewards.checkpoint import load_strict, read_state_dict, require_keys
from rewards.clip_models import ClipSimilarity
from rewards.files import FileSpec
from rewards.openclip import REQUIRED_KEYS, openclip_config, openclip_to_hf
from rewards.tokenizers import load_tokenizer

# OpenCLIP ViT-H-14 (model_configs/ViT-H-14.json): vision head_width 80, text width 1024 with
# 16 heads (64 each), GELU (not QuickGELU). Head counts are not in the weights.
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
HIDDEN_ACT = "gelu"

_TOKENIZER = FileSpec(
    "hps_tokenizer", "dir",
    "the OpenCLIP ViT-H-14 tokenizer as a transformers CLIP tokenizer directory (vocab.json+merges.txt), "
    "e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
)
HPSV2_FILES = (
    FileSpec("hpsv2", "file", "HPS_v2_compressed.pt from xswu/HPSv2 on the Hugging Face hub",
             filename="HPS_v2_compressed.pt"),
    _TOKENIZER,
)
HPSV21_FILES = (
    FileSpec("hpsv2_1", "file", "HPS_v2.1_compressed.pt from xswu/HPSv2 on the Hugging Face hub",
             filename="HPS_v2.1_compressed.pt"),
    _TOKENIZER,
)


def _build(name: str, files: tuple[FileSpec, FileSpec], *, paths: Mapping[str, str] | None,
           device, dtype) -> ClipSimilarity:
    from transformers import CLIPModel

    ckpt_spec, tok_spec = files
    path = ckpt_spec.resolve(paths)
    what = f"an HPSv2 checkpoint ({ckpt_spec.what})"
    state_dict = read_state_dict(path, what=what)
    require_keys(state_dict, REQUIRED_KEYS, path=path, what=what)
    vocab = state_dict["token_embedding.weight"].shape[0]
    tokenizer = load_tokenizer(tok_spec.resolve(paths), kind="clip", key=tok_spec.key, what=tok_spec.what,
                               vocab_size=vocab)
    config = openclip_config(
        state_dict, vision_head_width=VISION_HEAD_WIDTH, text_head_width=TEXT_HEAD_WIDTH, hidden_act=HIDDEN_ACT,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, path=path, what=what,
    )
    clip = CLIPModel(config)
    load_strict(clip, openclip_to_hf(state_dict, path=path, what=what), path=path, what=what)
    clip = clip.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return ClipSimilarity(clip, tokenizer, name=name, scale=1.0, letterbox=True)


def build_hpsv2(*, paths: Mapping[str, str] | None, device, dtype: torch.dtype) -> ClipSimilarity:
    """HPSv2.0 from `HPS_v2_compressed.pt`."""
    return _build("hpsv2", HPSV2_FILES, paths=paths, device=device, dtype=dtype)


def build_hpsv2_1(*, paths: Mapping[str, str] | None, device, dtype: torch.dtype) -> ClipSimilarity:
    """HPSv2.1 from `HPS_v2.1_compressed.pt`."""
    return _build("hpsv2_1", HPSV21_FILES, paths=paths, device=device, dtype=dtype)


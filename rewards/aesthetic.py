"""LAION aesthetic predictor v2 (improved-aesthetic-predictor): a linear head on the
L2-normalised CLIP ViT-L/14 image embedding. Prompt-independent; differentiable.

Files: the head `sac+logos+ava1-l14-linearMSE.pth` (keys `layers.{0,2,4,6,7}.*`) and the
CLIP ViT-L/14 as a transformers `CLIPModel` directory (openai/clip-vit-large-patch14), which
is the same network as OpenAI's `ViT-L/14` the head was trained on.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from rewards.checkpoint import read_state_dict
from rewards.clip_models import clip_image_embeds, load_clip_dir, processor_stats
from rewards.files import FileSpec
from rewards.mlp_head import LinearStack, linear_stack_from_state_dict
from rewards.preprocess import clip_preprocess

FILES = (
    FileSpec("aesthetic", "file",
             "sac+logos+ava1-l14-linearMSE.pth from christophschuhmann/improved-aesthetic-predictor",
             filename="sac+logos+ava1-l14-linearMSE.pth"),
    FileSpec("aesthetic_clip", "dir", "the CLIP ViT-L/14 CLIPModel directory (openai/clip-vit-large-patch14)"),
)
WHAT = "the LAION aesthetic head sac+logos+ava1-l14-linearMSE.pth"


class AestheticScorer(nn.Module):
    """`[B,3,H,W]` in [0,1] (prompts ignored) -> `[B]` predicted aesthetic rating (about 1..10)."""

    name = "aesthetic"
    differentiable = True

    def __init__(self, clip, head: LinearStack, *, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.clip = clip
        self.head = head
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_size = int(clip.config.vision_config.image_size)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        param = next(self.clip.parameters())
        pixels = clip_preprocess(images.to(param.device), self.image_size, mean=self.mean, std=self.std,
                                 dtype=param.dtype)
        embed = nn.functional.normalize(clip_image_embeds(self.clip, pixels).float(), dim=-1)
        return self.head(embed).squeeze(-1)


def build_aesthetic(*, paths: Mapping[str, str] | None, device, dtype: torch.dtype) -> AestheticScorer:
    head_spec, clip_spec = FILES
    head_path, clip_dir = head_spec.resolve(paths), clip_spec.resolve(paths)
    head = linear_stack_from_state_dict(read_state_dict(head_path, what=WHAT), path=head_path, what=WHAT)
    clip = load_clip_dir(clip_dir, key=clip_spec.key, what=clip_spec.what, device=device, dtype=dtype)
    if clip.config.projection_dim != head.in_features:
        raise ValueError(
            f"{head_path} takes {head.in_features}-d embeddings but the CLIP model in {clip_dir} projects to "
            f"{clip.config.projection_dim}; the head needs CLIP ViT-L/14 (768-d)"
        )
    mean, std = processor_stats(clip_dir)
    return AestheticScorer(clip, head.to(device).float().eval().requires_grad_(False), mean=mean, std=std)

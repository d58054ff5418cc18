"""Stable Diffusion 1.5's shapes with random weights, saved as a diffusers directory for the benches.

No weights can be downloaded here, but speed ratios depend on shapes, not on trained values: the
U-Net (320/640/1280/1280 channels, 2 layers per block, cross-attention dim 768, head dim 8),
the VAE (128/256/512/512) and CLIP ViT-L/14's text encoder (12 layers, width 768, MLP 3072,
12 heads, quick GELU) are built from SD 1.5's published configs, with the toy tokenizer's word
vocabulary (prompt length 77 as in SD; the 49408-row embedding is kept). `--sample-size` sets
the U-Net's native latent size (SD: 64, i.e. 512 px); a smaller one keeps CPU runs short while
every layer keeps its width.

    python bench/sd15_shaped.py runs/sd15-shaped --sample-size 32      # 256 px, ~4.3 GB fp32, ~1 min
    python bench/learner_overhead.py runs/sd15-shaped --batch 2 --repeats 5 sample.num_steps=10
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_sd15_shaped_pipeline(sample_size: int = 64, seed: int = 0):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from toyworld.tiny import sd_ddim_scheduler, toy_tokenizer

    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sample-size", type=int, default=64, help="the U-Net's latent size (SD 1.5: 64)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = build_sd15_shaped_pipeline(args.sample_size, args.seed)
    pipe.save_pretrained(args.out)
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    print(f"wrote {args.out}: " + ", ".join(f"{name} {n / 1e6:.0f}M parameters" for name, n in counts.items()))


if __name__ == "__main__":
    main()

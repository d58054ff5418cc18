"""Synthetic scenes and the short pretraining that makes the tiny pipeline follow colour words."""
from __future__ import annotations

import pytest
import torch

from rewards.color import COLORS as RGB
from rl.prompts import BUILTIN
from rl.synthetic import COVERAGE, denoising_loss, pretrain_tiny, synthetic_scenes, vae_loss


def _scenes(seed: int, n: int = 64, size: int = 64):
    return synthetic_scenes(n, size=size, generator=torch.Generator().manual_seed(seed), return_masks=True)


def test_scenes_are_deterministic_from_the_generator():
    images, captions, masks = _scenes(0)
    again, captions_again, masks_again = _scenes(0)
    other, _, _ = _scenes(1)
    assert torch.equal(images, again) and captions == captions_again and torch.equal(masks, masks_again)
    assert not torch.equal(images, other)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1


def test_captions_use_the_builtin_prompt_format():
    _, captions, _ = _scenes(0, n=256, size=16)
    assert set(captions) <= set(BUILTIN["colors"])
    assert len(set(captions)) > 40  # draws cover most of the 80 prompts


def test_object_pixels_have_the_caption_colour_and_the_intended_coverage():
    images, captions, masks = _scenes(2)
    coverage = masks.float().mean((1, 2))
    assert COVERAGE[0] - 0.05 < coverage.min() and coverage.max() < COVERAGE[1] + 0.05
    for image, caption, mask in zip(images, captions, masks):
        rgb = torch.tensor(RGB[caption.split()[1]])
        inside = image[:, mask].T  # [pixels, 3]
        outside = image[:, ~mask].T
        assert (inside - rgb).abs().max() < 1e-6
        # the background is muted: far from every saturated corner, so the object stands out
        assert (outside - rgb).norm(dim=1).mean() > 0.3


def _held_out_losses(pipe) -> tuple[float, float]:
    """VAE reconstruction and denoising loss on one fixed batch, with fixed noise."""
    from diffusers import DDPMScheduler

    images, captions = synthetic_scenes(8, size=64, generator=torch.Generator().manual_seed(99))
    x = images * 2 - 1
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, recon, _ = vae_loss(pipe.vae, x, generator)
        x_0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        # average a few noise draws: one draw of 8 timesteps is too noisy to compare
        denoising = sum(denoising_loss(pipe, scheduler, x_0, captions, generator) for _ in range(4)) / 4
    return recon.item(), denoising.item()


def test_a_short_pretraining_reduces_both_losses_and_round_trips(tmp_path, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    from rl.models import load_pipeline

    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    recon_before, _ = _held_out_losses(pipe)
    metrics = pretrain_tiny(
        pipe, vae_steps=30, unet_steps=20, batch_size=4, vae_batch_size=4, num_scenes=64, learning_rate=2e-3,
        progress=False,
    )
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    # the denoising loss is measured after the VAE changed, so both runs use the new VAE's latents
    recon_after, denoising_after = _held_out_losses(pipe)
    assert recon_after < 0.8 * recon_before  # ~0.65x after 20 steps
    fresh = load_pipeline(tiny_sd_dir, device="cpu")
    fresh.vae = pipe.vae
    _, denoising_untrained = _held_out_losses(fresh)
    assert denoising_after < 0.8 * denoising_untrained  # ~0.25x: it learns the noise scale first
    assert set(metrics) >= {"vae_loss", "vae_recon", "vae_kl", "unet_loss", "scaling_factor"}

    scaling_factor = pipe.vae.config.scaling_factor
    assert scaling_factor == metrics["scaling_factor"] != pytest.approx(0.18215)
    pipe.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pretrained")
    assert loaded.vae.config.scaling_factor == pytest.approx(scaling_factor)
    for name in ("vae", "unet", "text_encoder"):
        expected = getattr(pipe, name).state_dict()
        for key, value in getattr(loaded, name).state_dict().items():
            assert torch.equal(value, expected[key]), f"{name}.{key}"

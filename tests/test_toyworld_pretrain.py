"""The short pretraining that makes the tiny pipeline follow its captions (toyworld.pretrain)."""
from __future__ import annotations

import pytest
import torch

from toyworld.pretrain import denoising_loss, pretrain_tiny, vae_loss
from toyworld.scenes import synthetic_scenes


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

"""The short pretraining that makes the tiny pipeline follow its captions (toyworld.pretrain)."""
from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from toyworld.pretrain import FINAL_LR_FRACTION, _warmup_cosine, denoising_loss, pretrain_tiny, vae_loss
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


def test_each_phase_trains_on_what_it_should_and_the_seed_decides_the_run(tiny_sd_dir, monkeypatch):
    """Recorded at each loss: the VAE's scenes in [-1, 1]; the denoiser's latents drawn from q(z|x) of a pooled scene,
    scaled to unit std by the fitted factor, with that scene's caption or, about a tenth of the time, ""; every scene
    drawn from the given pairs; the text encoder trained with the U-Net; another seed, other scenes."""
    from rl.models import load_pipeline
    from toyworld import pretrain

    class Stop(Exception):
        pass

    pairs = [("red", "ball"), ("blue", "car")]
    seen = {"pairs": [], "vae": [], "unet": [], "pool": [], "stop": False}
    scenes, encode = pretrain.synthetic_scenes, pretrain.encode_scenes
    vae, denoising = pretrain.vae_loss, pretrain.denoising_loss

    def record_scenes(n, *, combinations, **kwargs):
        seen["pairs"].append(combinations)
        return scenes(n, combinations=combinations, **kwargs)

    def record_vae(v, x, g):
        seen["vae"].append(x)
        if seen["stop"]:
            raise Stop
        return vae(v, x, g)

    monkeypatch.setattr(pretrain, "synthetic_scenes", record_scenes)
    monkeypatch.setattr(pretrain, "encode_scenes", lambda *a, **k: seen["pool"].append(encode(*a, **k)) or seen["pool"][0])
    monkeypatch.setattr(pretrain, "vae_loss", record_vae)
    monkeypatch.setattr(pretrain, "denoising_loss",
                        lambda p, s, x_0, c, g: seen["unet"].append((x_0, c)) or denoising(p, s, x_0, c, g))
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    text = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pretrain_tiny(pipe, vae_steps=2, unet_steps=4, batch_size=16, vae_batch_size=4, num_scenes=32, combinations=pairs,
                  progress=False)
    assert len(seen["pairs"]) == 4 and all(p == pairs for p in seen["pairs"])  # VAE x2, scaling factor, pool
    x = torch.cat(seen["vae"])
    assert x.min() == -1 and x.max() == 1  # the objects' pure colours, in the decoder's range [-1, 1]
    x_0 = torch.cat([x_0 for x_0, _ in seen["unet"]])
    assert 0.95 < x_0.std() < 1.05  # ~1.00; unscaled ~1.10 (the fitted factor is ~0.91)
    (means, stds, pool_captions), = seen["pool"]
    captions = []
    for x_0, batch in seen["unet"]:
        z = x_0 / pipe.vae.config.scaling_factor
        drawn = torch.cdist(z.flatten(1), means.flatten(1)).argmin(1)  # the pooled scene each latent is drawn from
        assert 0.9 < ((z - means[drawn]) / stds[drawn]).std() < 1.1  # z ~ q(z|x), not its mean
        assert all(c in ("", pool_captions[i]) for c, i in zip(batch, drawn.tolist()))
        captions += batch
    assert len(captions) == 64 and set(captions) == {"a red ball", "a blue car", ""}
    assert 0.03 < captions.count("") / len(captions) < 0.2  # CAPTION_DROPOUT = 0.1
    assert any(not torch.equal(v, text[k]) for k, v in pipe.text_encoder.state_dict().items())
    first_scenes = seen["vae"][0]
    seen["stop"] = True
    with pytest.raises(Stop):  # seed 1's first VAE batch, then stop
        pretrain_tiny(load_pipeline(tiny_sd_dir, device="cpu"), vae_steps=2, unet_steps=4, vae_batch_size=4, seed=1,
                      combinations=pairs, progress=False)
    assert not torch.equal(seen["vae"][-1], first_scenes)


def test_the_denoising_loss_noises_x0_to_a_random_step_and_scores_the_noise(pipe):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I) and t over the whole schedule; the loss is the
    mean squared error of the U-Net's eps (here a U-Net that predicts 0: the mean of eps^2)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    seen = {}

    def unet(x_t, t, encoder_hidden_states):
        seen.update(x_t=x_t, t=t)
        return SimpleNamespace(sample=torch.zeros_like(x_t))

    x_0 = torch.full((64, 4, 16, 16), 3.0)
    stub = SimpleNamespace(unet=unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    with torch.no_grad():
        loss = denoising_loss(stub, scheduler, x_0, ["a red ball"] * 64, torch.Generator().manual_seed(0))
    abar = scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    eps = (seen["x_t"] - abar.sqrt() * x_0) / (1 - abar).sqrt()
    assert abs(eps.mean()) < 0.05 and 0.95 < eps.std() < 1.05
    assert loss.item() == pytest.approx(eps.pow(2).mean().item(), rel=1e-3)
    assert len(set(seen["t"].tolist())) > 50 and 0 <= seen["t"].min() and seen["t"].max() < 1000


def test_the_vae_loss_decodes_a_draw_from_the_posterior(pipe):
    """The reconstruction is of z ~ q(z|x), drawn with the generator given (decoding the mean would leave the KL term
    nothing to trade against)."""
    x = synthetic_scenes(2, size=64, generator=torch.Generator().manual_seed(0))[0] * 2 - 1
    with torch.no_grad():
        first, again, other = (vae_loss(pipe.vae, x, torch.Generator().manual_seed(seed))[1] for seed in (0, 0, 1))
    assert first == again != other


def test_the_learning_rate_warms_up_then_decays_to_a_tenth():
    factor = _warmup_cosine(1000, warmup=200)
    values = [factor(step) for step in range(1001)]
    assert values[0] == pytest.approx(1 / 200) and max(values) == values[199]  # linear warmup over 200 steps
    assert all(a >= b for a, b in pairwise(values[199:]))  # then the cosine decay
    assert values[500] == pytest.approx(FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) / 2)
    assert values[1000] == pytest.approx(0.1)  # FINAL_LR_FRACTION
    assert _warmup_cosine(10, warmup=0)(0) == 1  # no warmup (the VAE): the first step at the full rate

"""Sampling records a consistent policy: recomputed log-probs equal the sampler's."""
import pytest
import torch
from conftest import perturb_lora

from rl.config import LoraSettings
from rl.ddim import DDIMSchedule
from rl.lora import add_lora
from rl.models import load_pipeline
from rl.sampling import encode, sample_trajectories, step_distribution


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # float16: tests/test_precision.py (slow on CPU)
def test_recomputed_log_prob_equals_sampler_for_every_step(tiny_sd_dir, dtype):
    pipe = load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu")
    params = add_lora(pipe, LoraSettings(policy="text_encoder", rank=4, alpha=4))
    perturb_lora(params)  # the LoRA is active, not an identity
    prompts = ["a red ball", "a blue car", "a red ball"]
    traj = sample_trajectories(pipe, prompts, [0, 1, 2], num_steps=5, guidance_scale=5.0, eta=1.0)
    assert traj.latents.shape == (3, 6, 4, 16, 16)
    assert traj.log_probs.shape == (3, 5) and traj.images.dtype == torch.uint8
    # float16 for a half-precision model (half the bytes; rl.sampling.latent_storage_dtype), rounded as sampled
    assert traj.latents.dtype == (torch.float32 if dtype == "float32" else torch.float16)
    assert traj.log_probs.dtype == torch.float32
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, 5)
    with torch.no_grad():
        cond, uncond = encode(pipe.text_encoder, traj.prompt_ids), encode(pipe.text_encoder, traj.negative_ids)
        # steps in a shuffled order per sample, so the U-Net sees mixed timesteps in one batch
        order = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(b)) for b in range(3)])
        rows = torch.arange(3)
        for k in range(5):
            j = order[:, k]
            log_prob = step_distribution(
                pipe.unet, schedule, traj.latents[rows, j], traj.timesteps[rows, j], traj.latents[rows, j + 1],
                cond, uncond, guidance_scale=5.0, eta=1.0,
            )[0]
            ratio = torch.exp(log_prob - traj.log_probs[rows, j])
            torch.testing.assert_close(ratio, torch.ones(3), rtol=0, atol=1e-5)


def test_samples_depend_only_on_their_own_seed(pipe):
    both = sample_trajectories(pipe, ["a red ball", "a cat"], [7, 8], num_steps=4, guidance_scale=5.0, eta=1.0)
    alone = sample_trajectories(pipe, ["a cat"], [8], num_steps=4, guidance_scale=5.0, eta=1.0)
    torch.testing.assert_close(both.latents[1], alone.latents[0], rtol=1e-3, atol=1e-4)
    other = sample_trajectories(pipe, ["a cat"], [9], num_steps=4, guidance_scale=5.0, eta=1.0)
    assert not torch.allclose(other.latents[0, -1], alone.latents[0, -1])


def test_each_sample_draws_x_T_then_one_noise_per_step_from_its_own_seed(pipe):
    """The documented stream: a sample's generator gives x_T, then step j's noise as its (j+2)-th draw,
    whatever the device (drawn on the host before the loop). Read back from the trajectory: at eta 1,
    noise = (x_{t-1} - mean) / sigma_t."""
    seeds, steps = [5, 11], 3
    traj = sample_trajectories(pipe, ["a red ball", "a cat"], seeds, num_steps=steps, guidance_scale=5.0, eta=1.0)
    expected = _generator_draws(seeds, traj.latents.shape[2:], 1 + steps)
    for b in range(2):
        torch.testing.assert_close(traj.latents[b, 0], expected[b][0] * pipe.scheduler.init_noise_sigma)
    noise = _step_noise(pipe, traj)
    for j in range(steps):
        for b in range(2):
            torch.testing.assert_close(noise[b, j], expected[b][1 + j], rtol=0, atol=2e-3)


def test_start_seeds_give_a_group_one_x_T_and_leave_each_sample_its_own_step_noise(pipe):
    """sample.shared_start_noise: x_T from the start seed's first draw, step j's noise from the sample's own seed
    as without it, so the group's first sample (its own start seed) is the trajectory it is without sharing."""
    prompts, seeds, steps = ["a red ball"] * 3, [5, 6, 7], 3
    kwargs = dict(num_steps=steps, guidance_scale=5.0, eta=1.0)
    own = sample_trajectories(pipe, prompts, seeds, **kwargs)
    shared = sample_trajectories(pipe, prompts, seeds, start_seeds=[5, 5, 5], **kwargs)
    torch.testing.assert_close(shared.latents[0], own.latents[0], rtol=0, atol=0)
    for b in (1, 2):
        assert torch.equal(shared.latents[b, 0], own.latents[0, 0])
        assert not torch.allclose(shared.latents[b, 0], own.latents[b, 0])
    assert not torch.allclose(shared.latents[1, -1], shared.latents[2, -1], atol=1e-2)  # the steps still differ
    expected = _generator_draws(seeds, shared.latents.shape[2:], 1 + steps)
    noise = _step_noise(pipe, shared)
    for j in range(steps):
        for b in range(3):
            torch.testing.assert_close(noise[b, j], expected[b][1 + j], rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="2 start seeds"):
        sample_trajectories(pipe, prompts, seeds, start_seeds=[5, 5], **kwargs)


def _generator_draws(seeds: list[int], shape: torch.Size, count: int) -> list[list[torch.Tensor]]:
    """The first `count` standard-normal draws of each seed's CPU generator."""
    return [[torch.randn(shape, generator=g) for _ in range(count)]
            for g in (torch.Generator().manual_seed(s) for s in seeds)]


def _step_noise(pipe, traj) -> torch.Tensor:
    """[B, T, C, h, w] the noise each step drew, read back from the trajectory: at eta 1,
    noise = (x_{t-1} - mean) / sigma_t."""
    from rl.ddim import ddim_step_with_logprob
    from rl.sampling import guided_noise_prediction

    steps = traj.timesteps.shape[1]
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, steps)
    noise = []
    with torch.no_grad():
        cond, uncond = encode(pipe.text_encoder, traj.prompt_ids), encode(pipe.text_encoder, traj.negative_ids)
        for j in range(steps):
            eps = guided_noise_prediction(pipe.unet, traj.latents[:, j], traj.timesteps[:, j], cond, uncond, 5.0)
            _, _, mean, sigma = ddim_step_with_logprob(schedule, eps, traj.timesteps[:, j], traj.latents[:, j],
                                                       eta=1.0, prev_sample=traj.latents[:, j + 1])
            noise.append((traj.latents[:, j + 1] - mean) / sigma.view(-1, 1, 1, 1))
    return torch.stack(noise, dim=1)


def test_negative_prompt_goes_through_the_lora(pipe):
    params = add_lora(pipe, LoraSettings(rank=4, alpha=4))
    ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    base = encode(pipe.text_encoder, ids)
    perturb_lora(params, scale=0.5)
    assert not torch.allclose(encode(pipe.text_encoder, ids), base)
    a = sample_trajectories(pipe, ["a cat"], [1], num_steps=3, guidance_scale=5.0, eta=1.0)
    b = sample_trajectories(pipe, ["a cat"], [1], num_steps=3, guidance_scale=5.0, eta=1.0, negative_prompt="blurry")
    assert not torch.equal(a.negative_ids, b.negative_ids)
    assert not torch.allclose(a.latents[:, -1], b.latents[:, -1])


def test_select_and_cat_round_trip(pipe):
    traj = sample_trajectories(pipe, ["a", "b", "c"], [0, 1, 2], num_steps=2, guidance_scale=2.0, eta=1.0)
    parts = [traj.select([2]), traj.select([0, 1])]
    joined = type(traj).cat(parts)
    assert joined.prompts == ["c", "a", "b"]
    torch.testing.assert_close(joined.latents[0], traj.latents[2])
    # kept latents (chain positions 0 and 2 of 0-2) travel with their positions through select and cat
    kept = traj.keep_latents(torch.tensor([2, 0]))
    assert kept.latents.shape[1] == 2 and kept.latent_positions.tolist() == [[0, 2]] * 3
    joined = type(traj).cat([kept.select([2]), kept.select([0, 1])])
    assert torch.equal(joined.latents_at(torch.tensor([[2], [0], [2]]))[:, 0],
                       torch.stack([traj.latents[2, 2], traj.latents[0, 0], traj.latents[1, 2]]))
    with pytest.raises(ValueError, match="with and without latent_positions"):
        type(traj).cat([traj.select([0]), kept.select([1])])


def test_guidance_scale_one_is_the_conditional_prediction_and_zero_the_unconditional(pipe):
    """eps_hat = eps_u + w (eps_c - eps_u): the sampler and the learner share the formula, so a wrong one is
    self-consistent and passes the log-prob checks; read it against the U-Net's own two predictions."""
    from rl.sampling import guided_noise_prediction, tokenize

    ids = tokenize(pipe.tokenizer, ["a red ball", ""])
    with torch.no_grad():
        cond, uncond = encode(pipe.text_encoder, ids).chunk(2)
        x_t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        eps_c = pipe.unet(x_t, t, encoder_hidden_states=cond).sample
        eps_u = pipe.unet(x_t, t, encoder_hidden_states=uncond).sample
        assert not torch.allclose(eps_c, eps_u, atol=1e-3)
        for w, expected in [(1.0, eps_c), (0.0, eps_u), (3.0, eps_u + 3.0 * (eps_c - eps_u))]:
            got = guided_noise_prediction(pipe.unet, x_t, t, cond, uncond, w)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_decoded_images_are_clamped_to_the_unit_range(pipe):
    """Rewards take [0, 1] pixels, and the gradient learners score `decode_latents`' output directly (no uint8
    round trip clamps it): latents far out of range must still decode into [0, 1]."""
    from rl.sampling import decode_latents

    latents = 50 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = decode_latents(pipe.vae, latents)
    assert images.min() >= 0 and images.max() <= 1
    assert ((images == 0) | (images == 1)).any()  # the clamp did bite


def test_images_round_to_the_nearest_uint8_level():
    """uint8 is how images travel to the rewards: rounding, not truncation, so a float image comes back within
    half a level (truncation would darken every image by half a level on average)."""
    from rl.sampling import images_to_float, images_to_uint8

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert images_to_uint8(torch.tensor([0.999, 0.5 / 255 + 1e-4, -0.2, 1.3])).tolist() == [255, 1, 0, 255]
    assert (images_to_float(images_to_uint8(images)) - images).abs().max() <= 0.5 / 255 + 1e-6


def test_an_image_with_some_non_finite_pixels_is_marked_not_finite(pipe):
    """`images_finite` must hold for every pixel: one NaN channel (here from a NaN bias of the VAE's last conv)
    rounds to black in uint8, which a reward would score like any picture."""
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    traj = sample_trajectories(pipe, ["a cat", "a dog"], [0, 1], num_steps=2, guidance_scale=5.0, eta=1.0)
    assert traj.images_finite.tolist() == [False, False]
    assert (traj.images[:, 1:] > 0).any()  # the other channels decoded as usual

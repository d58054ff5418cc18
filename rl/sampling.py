"""Sampling trajectories with classifier-free guidance, and recomputing a step's log-prob.

This is the DDIM loop of diffusers' StableDiffusionPipeline written out so that each step
records (x_t, x_{t-1}, log-prob). Changes from the pipeline: per-sample seeds (a sample does
not depend on its batch-mates, so sharding across samplers is reproducible), the negative
prompt is encoded by the same (LoRA'd) text encoder, and the step is `ddim_step_with_logprob`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.utils.checkpoint

from rl.ddim import DDIMSchedule, ddim_step_with_logprob


@dataclass
class Trajectories:
    """A batch of B sampled trajectories of T DDIM steps.

    prompt_ids, negative_ids: [B, L] token ids; timesteps: [B, T] long;
    latents: [B, T+1, C, h, w] float32, or float16 from a half-precision pipeline (`latent_storage_dtype`),
    with latents[:, j] = x_t and latents[:, j+1] = x_{t-1} for t = timesteps[:, j]; log_probs: [B, T]
    float32 (the sampler's, i.e. old, log-probs of the stored latents);
    images: [B, 3, H, W] uint8, or None where they travel apart (a sampler's shard: the learner does not
    read them); images_finite: [B] bool, whether each decoded image was finite before its rounding to uint8
    (which makes NaN black, a picture a reward scores like any other), or None with the images;
    seeds: [B] long; policy_version: the LoRA version that sampled.
    latent_positions: None when every latent is kept; else [B, S] long, sorted, with latents [B, S, ...]
    holding the chain's latents at those positions only (0 = x_T, j + 1 = after step j): a sampler keeps
    what the learner reads (`keep_latents`); read them with `latents_at`.
    """

    prompts: list[str]
    prompt_ids: torch.Tensor
    negative_ids: torch.Tensor
    timesteps: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor | None
    seeds: torch.Tensor
    policy_version: int = 0
    latent_positions: torch.Tensor | None = None
    images_finite: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def keep_latents(self, positions: torch.Tensor) -> "Trajectories":
        """These trajectories with only the latents at chain `positions` (a copy: nothing else travels)."""
        if self.latent_positions is not None:
            raise ValueError("these trajectories keep some latents already")
        positions = torch.as_tensor(positions, dtype=torch.long).unique()  # sorted
        latents = self.latents[:, positions]  # indexing with a tensor copies
        return replace(self, latents=latents, latent_positions=positions.repeat(len(self), 1))

    def latents_at(self, positions: torch.Tensor) -> torch.Tensor:
        """[b, K, C, h, w]: row i's latents at chain positions `positions[i]` ([b, K] long; x_t of step j
        is at j, x_{t-1} at j + 1)."""
        rows = torch.arange(len(self))[:, None]
        if self.latent_positions is None:
            return self.latents[rows, positions]
        kept, positions = self.latent_positions.contiguous(), positions.contiguous()  # as searchsorted wants them
        columns = torch.searchsorted(kept, positions).clamp(max=kept.shape[1] - 1)
        if not torch.equal(kept.gather(1, columns), positions):
            missing = sorted(set(positions.flatten().tolist()) - set(kept.flatten().tolist()))
            raise ValueError(f"the latents at chain positions {missing} were not kept (kept: {kept[0].tolist()}): "
                             "the sampler keeps those of the steps its config lets the learner train")
        return self.latents[rows, columns]

    def steps_at(self, step_index: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, ...]:
        """(x_t [b, K, C, h, w], t [b, K], x_{t-1}) of row i's stored steps `step_index[i]`, on `device`: what
        a learner recomputes a step's distribution from."""
        x_ts, x_prevs = self.latents_at(step_index), self.latents_at(step_index + 1)
        return x_ts.to(device), self.timesteps.gather(1, step_index).to(device), x_prevs.to(device)

    def select(self, index: torch.Tensor | list[int]) -> "Trajectories":
        """The trajectories at `index` (along the batch dimension)."""
        index = torch.as_tensor(index, dtype=torch.long)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                values[f.name] = value[index]
            elif isinstance(value, list):
                values[f.name] = [value[i] for i in index.tolist()]
            else:
                values[f.name] = value
        return Trajectories(**values)

    @staticmethod
    def cat(parts: list["Trajectories"]) -> "Trajectories":
        """Concatenate batches; `policy_version` is the oldest among them."""
        for f in fields(Trajectories):
            if len({getattr(p, f.name) is None for p in parts}) > 1:
                raise ValueError(f"cannot concatenate trajectories with and without {f.name}")
        values = {}
        for f in fields(Trajectories):
            items = [getattr(p, f.name) for p in parts]
            if isinstance(items[0], torch.Tensor):
                values[f.name] = torch.cat(items)
            elif isinstance(items[0], list):
                values[f.name] = [x for item in items for x in item]
            elif items[0] is None:  # images kept apart, or every latent kept
                values[f.name] = None
            else:
                values[f.name] = min(items)
        return Trajectories(**values)

    def images_float(self) -> torch.Tensor:
        """[B, 3, H, W] float32 in [0, 1], the input rewards take."""
        return images_to_float(self.images)


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [0, 1], the input rewards take."""
    return images.float() / 255.0


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> uint8, how images travel and are stored."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """[B, L] ids padded to the tokenizer's max length, as Stable Diffusion encodes prompts."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B, L, D] last hidden states (what the U-Net cross-attends to)."""
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device))[0]


def guided_noise_prediction(
    unet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """eps_hat = eps_u + w (eps_c - eps_u), both branches in one U-Net call.

    x_t: [B, C, h, w]; t: [B]; cond, uncond: [B, L, D]. Returns float32 [B, C, h, w].
    """
    dtype = unet.dtype
    latent_in = torch.cat([x_t, x_t]).to(dtype)
    eps = unet(latent_in, torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)).sample
    eps_u, eps_c = eps.float().chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def _seeded_draws(seeds: list[int], shape: tuple[int, ...], count: int, device: torch.device) -> torch.Tensor:
    """The first `count` standard-normal draws of each sample's own CPU generator: [count, len(seeds), *shape].

    Drawn before the loop and moved to the device in one copy, so the loop makes no host->device
    copies; the same numbers on every device, and a sample's draws do not depend on its batch-mates.
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    draws = torch.stack([torch.stack([torch.randn(shape, generator=g) for _ in range(count)]) for g in generators], dim=1)
    return draws.to(device)


def denoise(
    pipe,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    seeds: list[int],
    schedule: DDIMSchedule,
    *,
    guidance_scale: float,
    eta: float,
    height: int,
    width: int,
    start: torch.Tensor | None = None,
    steps: range | None = None,
    checkpoint: bool = False,
    start_seeds: list[int] | None = None,
    latent_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The DDIM loop with CFG from each seed's x_T: ([x_T, ..., x_0], [log-prob of each step]).

    Differentiable (the gradient learners backpropagate through it); `sample_trajectories`
    runs it without grad. Each sample's x_T and step noise come from its own seed, so a sample
    does not depend on its batch-mates.

    steps: the schedule's step indices to run (default all); with `start`, the latent at the
    first of them (default x_T), so a loop can run in pieces (no grad, then with grad) and give
    the whole loop's result: each step still gets the noise draw it gets in a full run.
    Returns then ([start, ...], [log-probs of those steps]). checkpoint: recompute each U-Net
    call in the backward pass instead of storing its activations (torch.utils.checkpoint).
    start_seeds: whose generator's first draw is each sample's x_T (default: its own seed's), so
    samples can share a start while each keeps its own step noise (sample.shared_start_noise).
    latent_dtype: the dtype the latents are kept in (a trajectory's storage; default: float32, as the
    step computes them). Each x_{t-1} is rounded to it before its log-prob is taken and the next step starts
    from it, so the stored chain is the one sampled: a learner recomputing a step from the stored
    x_t and x_{t-1} gets the recorded log-prob. (Scoring the unrounded x_{t-1} instead would put a
    mismatch of the rounding's size over sigma_t into every ratio; tests/test_precision.py.)
    """
    device = pipe.unet.device
    scale = pipe.vae_scale_factor
    latent_shape = (pipe.unet.config.in_channels, height // scale, width // scale)
    steps = range(schedule.num_steps) if steps is None else steps
    # each sample's draws: x_T, then one per step (those of the steps before this piece are skipped)
    draws = _seeded_draws(seeds, latent_shape, 1 + steps.stop, device)
    if start is None:
        x_T = draws[0] if start_seeds is None else _seeded_draws(start_seeds, latent_shape, 1, device)[0]
        start = x_T * pipe.scheduler.init_noise_sigma
        if latent_dtype is not None:
            start = start.to(latent_dtype)
    x = start
    latents, log_probs = [x], []
    for j in steps:
        t = torch.full((len(seeds),), int(schedule.timesteps[j]), device=device, dtype=torch.long)
        if checkpoint:
            eps_hat = torch.utils.checkpoint.checkpoint(
                guided_noise_prediction, pipe.unet, x, t, cond, uncond, guidance_scale, use_reentrant=False
            )
        else:
            eps_hat = guided_noise_prediction(pipe.unet, x, t, cond, uncond, guidance_scale)
        x, log_prob, _, _ = ddim_step_with_logprob(schedule, eps_hat, t, x, eta=eta, noise=draws[1 + j])
        if latent_dtype is not None and x.dtype != latent_dtype:  # score the value that is kept
            x = x.to(latent_dtype)
            _, log_prob, _, _ = ddim_step_with_logprob(schedule, eps_hat, t, latents[-1], eta=eta, prev_sample=x)
        latents.append(x)
        log_probs.append(log_prob)
    return latents, log_probs


@torch.no_grad()
def sample_trajectories(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    policy_version: int = 0,
    start_seeds: list[int] | None = None,
    latent_dtype: torch.dtype | None = None,
) -> Trajectories:
    """Roll out one DDIM trajectory per prompt with CFG and record every step's log-prob.

    seeds: each sample's noise; start_seeds: the seed of each sample's x_T, if not its own (`denoise`).
    latent_dtype: the dtype the latents are stored in (default `latent_storage_dtype` of the U-Net's),
    with the chain rounded to it as it is sampled (`denoise`).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if start_seeds is not None and len(start_seeds) != len(seeds):
        raise ValueError(f"got {len(seeds)} seeds but {len(start_seeds)} start seeds")
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, num_steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # pixels the U-Net was configured for
    # 1. encode prompt and negative prompt with the (LoRA'd) text encoder
    prompt_ids = tokenize(pipe.tokenizer, prompts)
    negative_ids = tokenize(pipe.tokenizer, [negative_prompt] * len(prompts))
    cond = encode(pipe.text_encoder, prompt_ids)
    uncond = encode(pipe.text_encoder, negative_ids)
    # 2. the DDIM loop from each sample's own seed
    latents, log_probs = denoise(
        pipe, cond, uncond, seeds, schedule, guidance_scale=guidance_scale, eta=eta,
        height=height or size, width=width or size, start_seeds=start_seeds,
        latent_dtype=latent_dtype or latent_storage_dtype(pipe.unet.dtype),
    )
    # 3. decode to uint8 images
    images = decode_latents(pipe.vae, latents[-1])
    return Trajectories(
        prompts=list(prompts),
        prompt_ids=prompt_ids,
        negative_ids=negative_ids,
        timesteps=schedule.timesteps.repeat(len(prompts), 1),
        latents=torch.stack(latents, dim=1).cpu(),
        log_probs=torch.stack(log_probs, dim=1).cpu(),
        images=images_to_uint8(images).cpu(),
        images_finite=torch.isfinite(images).flatten(1).all(dim=1).cpu(),
        seeds=torch.as_tensor(seeds, dtype=torch.long),
        policy_version=policy_version,
    )


def latent_storage_dtype(working: torch.dtype) -> torch.dtype:
    """The dtype a trajectory's latents are kept in: the pipeline's for float32, float16 for either
    half dtype (half the bytes). Not bfloat16: its steps are 8x coarser than float16's, and at the late
    steps' small sigma_t (~0.02 at the last) its rounding is a visible part of a step's noise. The PPO
    gradient of a step stored in bfloat16 had cosine 0.986-0.997 to float32's at the worst step on the
    toy model, 0.63 on the tests' random tiny model (13x larger latents); in float16 0.9994-0.9999 and
    0.993 (bench/latent_storage.py, docs/half_precision.md). float16's range (65504) holds any latent
    a DDIM chain visits."""
    return torch.float16 if working in (torch.float16, torch.bfloat16) else working


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] latents -> [B, 3, H, W] float images in [0, 1]."""
    image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def step_distribution(
    unet,
    schedule: DDIMSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    x_prev: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log pi(x_{t-1} | x_t, c) [B], the step's mean, sigma_t [B]) under the current weights.

    Differentiable in cond/uncond/U-Net. The step is Gaussian: N(mean, sigma_t^2 I).
    """
    eps_hat = guided_noise_prediction(unet, x_t, t, cond, uncond, guidance_scale)
    _, log_prob, mean, sigma = ddim_step_with_logprob(schedule, eps_hat, t, x_t, eta=eta, prev_sample=x_prev)
    return log_prob, mean, sigma


@torch.no_grad()
def recomputed_log_probs(
    unet,
    schedule: DDIMSchedule,
    batch: Trajectories,
    step_index: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
) -> torch.Tensor:
    """[b, K]: row i's log-prob of its stored step step_index[i, k], recomputed from the stored x_t and
    x_{t-1} under the current weights: what a learner checks against the sampler's `log_probs`."""
    x_ts, ts, x_prevs = batch.steps_at(step_index, unet.device)
    log_probs = [
        step_distribution(unet, schedule, x_ts[:, k], ts[:, k], x_prevs[:, k], cond, uncond,
                          guidance_scale=guidance_scale, eta=eta)[0]
        for k in range(step_index.shape[1])
    ]
    return torch.stack(log_probs, dim=1)

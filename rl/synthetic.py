"""Synthetic scenes and a short offline pretraining that makes the tiny pipeline follow colour words.

The random tiny pipeline (`rl.tiny`) ignores its prompt, and its random VAE cannot even paint
a globally coloured image, so no fine-tuning of the text encoder can raise `color_alignment`.
`pretrain_tiny` fixes that in a few CPU minutes, the way Stable Diffusion itself was made:

1. train the VAE as an autoencoder on synthetic scenes ("a red ball": one flat-coloured shape
   on a muted background) and set `vae.config.scaling_factor` so scaled latents have unit std;
2. train the U-Net and the text encoder together with the DDPM epsilon-prediction loss on
   those latents, dropping ~10% of captions to "" so classifier-free guidance works.

The object covers 15-45% of a scene, so a model that reproduces the scenes scores about
0.6-0.7 on `color_alignment`: clearly above the random model, yet with headroom for RL
(a bigger or purer object scores more).
"""
from __future__ import annotations

import math

import torch

from rewards.color import COLORS as _RGB
from rl.prompts import BUILTIN, COLORS

PALETTE = torch.tensor([_RGB[c] for c in COLORS])  # [len(COLORS), 3], the colours of rl.prompts
COVERAGE = (0.15, 0.45)  # fraction of the image the object covers, drawn uniformly


# --- scenes -----------------------------------------------------------------------------------
# Each shape is a mask in coordinates normalised by the object's scale s: u = (x - cx) / s,
# v = (y - cy) / s, y pointing down. `_UNIT_AREA` is each mask's area in those units
# (measured numerically), so s = sqrt(coverage / unit_area) gives the drawn coverage.


def _disc(u, v, cu, cv, r):
    return (u - cu) ** 2 + (v - cv) ** 2 < r**2


def _box(u, v, u0, u1, v0, v1):
    return (u > u0) & (u < u1) & (v > v0) & (v < v1)


def _ball(u, v):
    return _disc(u, v, 0, 0, 1)


def _car(u, v):
    body = _box(u, v, -1.2, 1.2, -0.1, 0.45)
    cabin = _box(u, v, -0.6, 0.6, -0.55, -0.1)
    return body | cabin | _disc(u, v, -0.65, 0.45, 0.28) | _disc(u, v, 0.65, 0.45, 0.28)


def _house(u, v):
    walls = _box(u, v, -0.8, 0.8, 0, 0.9)
    roof = (v > -0.85) & (v <= 0) & (u.abs() < 1.0 * (v + 0.85) / 0.85)
    return walls | roof


def _flower(u, v):
    r, theta = torch.sqrt(u**2 + v**2), torch.atan2(v, u)
    petals = r < 0.55 + 0.45 * torch.cos(2.5 * theta).abs()
    return petals | _box(u, v, -0.07, 0.07, 0, 1.25)


def _apple(u, v):
    body = _disc(u, v, -0.3, 0.05, 0.75) | _disc(u, v, 0.3, 0.05, 0.75)
    return body | _box(u, v, -0.06, 0.06, -1.05, -0.5)


def _bird(u, v):
    body = (u / 1.0) ** 2 + (v / 0.55) ** 2 < 1
    tail = (u < -0.7) & (u > -1.4) & (v.abs() < (-0.7 - u) * 0.6)
    beak = (u > 1.15) & (u < 1.45) & ((v + 0.45).abs() < (1.45 - u) * 0.4)
    return body | tail | _disc(u, v, 0.85, -0.45, 0.35) | beak


def _cup(u, v):
    handle_r = torch.sqrt((u - 0.6) ** 2 + v**2)
    handle = (handle_r > 0.25) & (handle_r < 0.45) & (u > 0.6)
    return _box(u, v, -0.65, 0.65, -0.8, 0.8) | handle


def _hat(u, v):
    return _box(u, v, -1.3, 1.3, 0.3, 0.55) | _box(u, v, -0.7, 0.7, -0.6, 0.35)


SHAPES = {"ball": _ball, "car": _car, "house": _house, "flower": _flower, "apple": _apple,
          "bird": _bird, "cup": _cup, "hat": _hat}  # fmt: skip
OBJECTS = list(SHAPES)
_UNIT_AREA = {"ball": 3.13, "car": 2.09, "house": 2.28, "flower": 2.3, "apple": 2.68,
              "bird": 2.28, "cup": 2.26, "hat": 1.89}  # fmt: skip
assert {f"a {c} {o}" for c in COLORS for o in OBJECTS} == set(BUILTIN["colors"]), "scenes cover the colour prompts"


def _uniform(n: int, low: float, high: float, generator: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=generator)


def synthetic_scenes(
    n: int, *, size: int, generator: torch.Generator, return_masks: bool = False
) -> tuple[torch.Tensor, list[str]] | tuple[torch.Tensor, list[str], torch.Tensor]:
    """n scenes `[n, 3, size, size]` in [0, 1] and their captions "a {color} {object}".

    A muted background (a flat colour or a two-colour gradient) and one flat-coloured shape
    covering `COVERAGE` of the image at a random place. Deterministic from `generator`.
    With `return_masks`, also the object masks `[n, size, size]` (bool).
    """
    g = generator
    color_idx = torch.randint(len(COLORS), (n,), generator=g)
    object_idx = torch.randint(len(OBJECTS), (n,), generator=g)
    coverage = _uniform(n, *COVERAGE, g)
    # background: two muted colours (grey in [0.3, 0.7] plus a small tint), blended along a direction
    ends = _uniform(n, 0.3, 0.7, g, 2, 1) + _uniform(n, -0.12, 0.12, g, 2, 3)  # [n, 2, 3]
    flat = torch.rand(n, generator=g) < 0.5
    ends[flat, 1] = ends[flat, 0]
    angle = _uniform(n, 0, 2 * math.pi, g)
    # object placement: scale s from the coverage, centre kept so most of the shape is inside
    unit_area = torch.tensor([_UNIT_AREA[o] for o in OBJECTS])[object_idx]
    s = torch.sqrt(coverage / unit_area)
    margin = (0.9 * s).clamp(max=0.45)
    cx, cy = (margin[:, None] + (1 - 2 * margin[:, None]) * torch.rand(n, 2, generator=g)).unbind(1)

    coords = (torch.arange(size) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    ramp = ((x - 0.5) * angle.cos().view(n, 1, 1) + (y - 0.5) * angle.sin().view(n, 1, 1)) * math.sqrt(2) + 0.5
    ramp = ramp.clamp(0, 1).unsqueeze(1)  # [n, 1, size, size]
    background = ends[:, 0, :, None, None] * (1 - ramp) + ends[:, 1, :, None, None] * ramp
    u = (x - cx.view(n, 1, 1)) / s.view(n, 1, 1)
    v = (y - cy.view(n, 1, 1)) / s.view(n, 1, 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k, shape in enumerate(SHAPES.values()):
        chosen = object_idx == k
        if chosen.any():
            masks[chosen] = shape(u[chosen], v[chosen])
    color = PALETTE[color_idx].view(n, 3, 1, 1)
    images = torch.where(masks.unsqueeze(1), color, background).clamp(0, 1)
    captions = [f"a {COLORS[c]} {OBJECTS[o]}" for c, o in zip(color_idx.tolist(), object_idx.tolist())]
    if return_masks:
        return images, captions, masks
    return images, captions


# --- pretraining ------------------------------------------------------------------------------

KL_WEIGHT = 1e-3  # per latent element; small, as in SD's VAE: keeps latents tame, not Gaussian
CAPTION_DROPOUT = 0.1  # fraction of captions replaced by "" so the U-Net also learns eps(x_t, "") for CFG
GRAD_CLIP = 1.0


def _scenes(batch_size: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """A fresh batch in the VAE's range [-1, 1]."""
    images, captions = synthetic_scenes(batch_size, size=size, generator=generator)
    return images * 2 - 1, captions


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Autoencoder loss of images `[B, 3, H, W]` in [-1, 1]: (loss, recon, kl), all scalars.

    recon = L1 + MSE of decode(z ~ q(z|x)) against x; kl = KL(q(z|x) || N(0, I)) per latent element.
    """
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.sample(generator)).sample
    recon = (x_hat - x).abs().mean() + (x_hat - x).pow(2).mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return recon + KL_WEIGHT * kl, recon, kl


def train_vae(vae, *, steps: int, batch_size: int, learning_rate: float, generator: torch.Generator,
              progress: bool) -> dict[str, float]:  # fmt: skip
    """Fit the VAE as an autoencoder on fresh scenes (`vae_loss`)."""
    from tqdm.auto import tqdm

    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    metrics = {"vae_loss": float("nan"), "vae_recon": float("nan"), "vae_kl": float("nan")}
    for _ in tqdm(range(steps), desc="pretrain vae", disable=not progress):
        x, _ = _scenes(batch_size, vae.config.sample_size, generator)
        loss, recon, kl = vae_loss(vae, x, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), GRAD_CLIP)
        optimizer.step()
        metrics = {"vae_loss": loss.item(), "vae_recon": recon.item(), "vae_kl": kl.item()}
    vae.eval().requires_grad_(False)
    return metrics


@torch.no_grad()
def fit_scaling_factor(vae, *, generator: torch.Generator, num_images: int = 256) -> float:
    """Set `vae.config.scaling_factor` to 1/std of the latents (SD's 0.18215 came from the same rule)."""
    x, _ = _scenes(num_images, vae.config.sample_size, generator)
    latents = vae.encode(x).latent_dist.sample(generator)
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return scaling_factor


@torch.no_grad()
def encode_scenes(vae, n: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n fresh scenes through the frozen VAE: posterior means and stds `[n, 4, h, w]` (unscaled), captions.

    The denoiser trains on a pool of these, drawing z ~ q(z|x) at every step: ~30% cheaper
    than drawing and encoding new scenes per step; 2048 scenes are ~25 per caption.
    """
    means, stds, captions = [], [], []
    for start in range(0, n, 256):
        x, batch_captions = _scenes(min(256, n - start), vae.config.sample_size, generator)
        posterior = vae.encode(x).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += batch_captions
    return torch.cat(means), torch.cat(stds), captions


def denoising_loss(pipe, noise_scheduler, x_0: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """DDPM loss ||eps - eps_theta(x_t, t, c)||^2 of scaled latents x_0 `[B, 4, h, w]` and their captions.

    t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, c = text_encoder(captions).
    Returns a scalar.
    """
    from rl.sampling import tokenize

    eps = torch.randn(x_0.shape, generator=generator)
    t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(x_0),), generator=generator)
    x_t = noise_scheduler.add_noise(x_0, eps, t)
    c = pipe.text_encoder(tokenize(pipe.tokenizer, captions))[0]
    eps_theta = pipe.unet(x_t, t, encoder_hidden_states=c).sample
    return (eps_theta - eps).pow(2).mean()


def train_denoiser(pipe, *, steps: int, batch_size: int, num_scenes: int, learning_rate: float,
                   generator: torch.Generator, progress: bool) -> dict[str, float]:  # fmt: skip
    """Train U-Net and text encoder jointly on `denoising_loss`, ~10% of captions dropped to ""."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    means, stds, pool_captions = encode_scenes(pipe.vae, num_scenes, generator=generator)
    scaling_factor = pipe.vae.config.scaling_factor
    params = [*unet.parameters(), *text_encoder.parameters()]
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=1e-2)
    metrics = {"unet_loss": float("nan")}
    for _ in tqdm(range(steps), desc="pretrain unet+text", disable=not progress):
        index = torch.randint(len(means), (batch_size,), generator=generator)
        z = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        drop = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
        captions = ["" if d else pool_captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        loss = denoising_loss(pipe, noise_scheduler, z * scaling_factor, captions, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        metrics = {"unet_loss": loss.item()}
    for module in (unet, text_encoder):
        module.eval().requires_grad_(False)
    return metrics


def pretrain_tiny(
    pipe,
    *,
    vae_steps: int,
    unet_steps: int,
    batch_size: int = 32,
    vae_batch_size: int = 16,
    num_scenes: int = 2048,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Pretrain a (tiny, CPU) SD pipeline on synthetic scenes so its text controls the image colour.

    Phase 1 trains the VAE and sets its scaling factor, phase 2 the U-Net and text encoder on
    the frozen VAE's latents. Deterministic from `seed` (on CPU). Modules end in eval mode,
    frozen. Returns the last step's losses and the scaling factor.
    """
    generator = torch.Generator().manual_seed(seed)
    metrics = train_vae(
        pipe.vae, steps=vae_steps, batch_size=vae_batch_size, learning_rate=learning_rate, generator=generator,
        progress=progress,
    )  # fmt: skip
    metrics["scaling_factor"] = fit_scaling_factor(pipe.vae, generator=generator)
    metrics |= train_denoiser(
        pipe, steps=unet_steps, batch_size=batch_size, num_scenes=num_scenes, learning_rate=learning_rate,
        generator=generator, progress=progress,
    )  # fmt: skip
    return metrics

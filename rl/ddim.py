"""DDIM with eta > 0 as a Gaussian policy: one step and the log-prob of the action.

Notation (DDIM paper, eq. 12 and 16):

| code            | paper                                      |
|-----------------|--------------------------------------------|
| `abar_t`        | alpha-bar_t, cumulative product of alphas   |
| `abar_prev`     | alpha-bar_{t-1} (the previous DDIM timestep) |
| `x0_hat`        | predicted x_0                               |
| `eps_hat`       | predicted noise                             |
| `sigma_t`       | eta * sqrt((1-abar_prev)/(1-abar_t)) * sqrt(1 - abar_t/abar_prev) |
| `mean`          | sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat |

The log-prob is the Gaussian log-density of x_{t-1} around `mean` with std `sigma_t`,
averaged (not summed) over latent dimensions, as in the DDPO reference code, so the published
clip range (1e-4) applies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class DDIMSchedule:
    """The discrete DDIM timesteps of one sampling run and the noise schedule they index.

    timesteps, prev_timesteps: [T] long, t and the previous DDIM timestep (negative at the end).
    """

    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None
    # alphas_cumprod on each device it was asked for: copied once, not at every step (a host->device copy syncs)
    _device_tables: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int) -> "DDIMSchedule":
        """Use a diffusers DDIMScheduler's config (spacing, offset, betas) for `num_steps` steps."""
        if scheduler.config.get("thresholding", False):
            raise ValueError("dynamic thresholding is not supported by the policy log-prob; set thresholding=False")
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {scheduler.config.prediction_type!r}: use epsilon or v_prediction")
        if float(scheduler.final_alpha_cumprod) >= 1.0:
            raise ValueError(
                "the scheduler has set_alpha_to_one=True, which makes the last DDIM step deterministic "
                "(sigma=0) and its log-prob undefined; load it with set_alpha_to_one=False"
            )
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.to(torch.long).cpu()
        step = scheduler.config.num_train_timesteps // num_steps
        return cls(
            timesteps=timesteps,
            prev_timesteps=timesteps - step,
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32).cpu(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            prediction_type=scheduler.config.prediction_type,
            clip_sample_range=scheduler.config.clip_sample_range if scheduler.config.clip_sample else None,
        )

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def prev_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Previous DDIM timestep of each t in `t` ([B] long)."""
        step = int(self.timesteps[0] - self.prev_timesteps[0])
        return t - step

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """abar at each timestep of `t` ([B] long); negative t means the final abar."""
        if t.device not in self._device_tables:
            self._device_tables[t.device] = self.alphas_cumprod.to(t.device)
        table = self._device_tables[t.device]
        final = torch.full_like(table[:1], self.final_alpha_cumprod).expand(t.shape)
        return torch.where(t >= 0, table[t.clamp(min=0)], final)


def ddim_sigma(schedule: DDIMSchedule, t: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t (eq. 16) of the step from each t in `t` ([B] long) -> [B] float32."""
    abar_t = schedule.alpha_bar(t)
    abar_prev = schedule.alpha_bar(schedule.prev_timestep(t))
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    return eta * variance.clamp(min=0).sqrt()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _predicted_x0_and_noise(
    schedule: DDIMSchedule, model_output: torch.Tensor, abar_t: torch.Tensor, x_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the model output at x_t; abar_t broadcast to x_t's shape."""
    if schedule.prediction_type == "epsilon":
        x0_hat = (x_t - (1 - abar_t).sqrt() * model_output) / abar_t.sqrt()
        eps_hat = model_output
    else:  # v_prediction
        x0_hat = abar_t.sqrt() * x_t - (1 - abar_t).sqrt() * model_output
        eps_hat = abar_t.sqrt() * model_output + (1 - abar_t).sqrt() * x_t
    if schedule.clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return x0_hat, eps_hat


def predicted_x0(schedule: DDIMSchedule, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """x0_hat, the clean latent the model predicts from x_t in one step (what ReFL scores).

    model_output, x_t: [B, C, H, W]; t: [B] long. Float32, differentiable.
    """
    x_t = x_t.float()
    abar_t = _bcast(schedule.alpha_bar(t.to(x_t.device).long()), x_t)
    return _predicted_x0_and_noise(schedule, model_output.float(), abar_t, x_t)[0]


def add_noise(schedule: DDIMSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: a clean latent re-noised to timestep t (DRaFT-LV)."""
    abar_t = _bcast(schedule.alpha_bar(t.to(x0.device).long()), x0)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * noise


def ddim_step_with_logprob(
    schedule: DDIMSchedule,
    model_output: torch.Tensor,
    t: torch.Tensor,
    x_t: torch.Tensor,
    *,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and the log-prob of x_{t-1}.

    model_output, x_t: [B, C, H, W]; t: [B] long (timesteps may differ across the batch).
    prev_sample: a given x_{t-1} to score (recomputation); else one is drawn with `noise`
    (standard normal, [B, C, H, W]; drawn here if None). Math runs in float32.
    Returns (prev_sample, log_prob [B], mean, sigma_t [B]). With eta = 0 the step is
    deterministic (plain DDIM, as evaluation and the gradient learners use it) and log_prob is NaN.
    """
    x_t = x_t.float()
    model_output = model_output.float()
    t = t.to(x_t.device).long()
    # 1. abar_t and abar_{t-1}
    abar_t = _bcast(schedule.alpha_bar(t), x_t)
    abar_prev = _bcast(schedule.alpha_bar(schedule.prev_timestep(t)), x_t)
    # 2. predicted x_0 and noise
    x0_hat, eps_hat = _predicted_x0_and_noise(schedule, model_output, abar_t, x_t)
    # 3. sigma_t (eq. 16)
    sigma_t = _bcast(ddim_sigma(schedule, t, eta), x_t)
    # 4. mean of x_{t-1} (eq. 12)
    mean = abar_prev.sqrt() * x0_hat + (1 - abar_prev - sigma_t**2).clamp(min=0).sqrt() * eps_hat
    # 5. the action
    if prev_sample is None:
        if noise is None:
            noise = torch.randn_like(x_t)
        prev_sample = mean + sigma_t * noise.to(x_t.device, torch.float32)
    prev_sample = prev_sample.float()
    # 6. Gaussian log-density, averaged over latent dimensions
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * sigma_t**2) - torch.log(sigma_t) - 0.5 * math.log(2 * math.pi)
    )
    log_prob = log_prob.mean(dim=tuple(range(1, x_t.ndim)))
    return prev_sample, log_prob, mean, sigma_t.flatten()


def ddim_step_gain(schedule: DDIMSchedule, t: torch.Tensor, eta: float) -> torch.Tensor:
    """Gain |c_t| / sigma_t of the step from each t in `t` ([B] long) -> [B] float32.

    c_t = d mean / d model_output (a scalar per step: the mean is linear in the model output),
    from the mean of `ddim_step_with_logprob`, for epsilon or v prediction. A step's score
    term is d log pi / d theta = z * (c_t / sigma_t) * d model_output / d theta with z ~ N(0, I),
    so its noise grows with this gain, not with 1/sigma_t. At eta = 1 with epsilon prediction
    gain^2 = SNR_{t-1} / SNR_t - 1 (SNR = abar / (1 - abar)). Ignores sample clipping
    (clipped elements have a smaller c_t). With eta = 0 the gain is infinite.
    """
    abar_t = schedule.alpha_bar(t)
    abar_prev = schedule.alpha_bar(schedule.prev_timestep(t))
    sigma_t = ddim_sigma(schedule, t, eta)
    direction = (1 - abar_prev - sigma_t**2).clamp(min=0).sqrt()  # the eps_hat coefficient of the mean
    if schedule.prediction_type == "epsilon":
        # mean = sqrt(abar_prev) (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t) + direction * eps
        c_t = direction - (abar_prev * (1 - abar_t) / abar_t).sqrt()
    else:  # v_prediction: x0_hat = sqrt(abar_t) x_t - sqrt(1-abar_t) v, eps_hat = sqrt(abar_t) v + sqrt(1-abar_t) x_t
        c_t = direction * abar_t.sqrt() - (abar_prev * (1 - abar_t)).sqrt()
    return c_t.abs() / sigma_t

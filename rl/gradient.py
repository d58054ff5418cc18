"""Gradient learners: backpropagate a differentiable reward through the sampler (DRaFT paper).

One loop covers DRaFT, DRaFT-K, DRaFT-LV, ReFL, AlignProp and TextCraftor (the DRaFT paper's
general reward fine-tuning algorithm): sample with DDIM at eta 0 and classifier-free guidance,
without grad for all but a window of steps, keep the graph for the window (each U-Net call
and the VAE decode checkpointed, so memory grows with the window by the stored latents only),
decode, and take `-reward` as the loss. The algorithm (rl/algorithms.py) picks the window:

| algorithm   | steps with grad                       | scored                                      |
|-------------|---------------------------------------|---------------------------------------------|
| draft       | all T                                 | the sample x_0                              |
| draft_k     | the last K                            | x_0                                         |
| draft_lv    | none in the loop; n copies, 1 step    | sum over n copies: x_0 re-noised to the last timestep, denoised in one step |
| alignprop   | the last K, K ~ U[1, max_k] per minibatch | x_0                                     |
| refl        | step m only, m ~ U[m_min, m_max]      | x0_hat predicted at step m                  |
| textcraftor | the last K = round(0.2 T), with the fine-tuned text encoder; the base encoder drives the rest | x_0 |

With gradient.kl_coef > 0 the loss adds DPOK's KL regulariser at one step with grad per minibatch
(`kl_to_base`): what the reward does not name is held to the base model.

The logged reward is always that of the finished sample x_0 (for ReFL the loop is finished
without grad after the backward pass), so reward curves compare across algorithms.

Pure PyTorch; the Ray learner actor wraps `GradientLearner` exactly as it wraps PPOLearner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rl.algorithms import Algorithm, get_algorithm
from rl.config import ConfigError, TexForceConfig
from rl.ddim import DDIMSchedule, add_noise, ddim_step_with_logprob, predicted_x0
from rl.learner import LoraLearner, UpdateHistory, _world_and_rank, accumulation_plan, optimizer_steps_per_epoch
from rl.lora import adapters_disabled
from rl.sampling import decode_latents, denoise, encode, guided_noise_prediction, images_to_uint8, tokenize


def reward_spec(config: TexForceConfig) -> str:
    """The reward a gradient learner maximises: reward.spec, plus TextCraftor's CLIP-score term when weighted."""
    weight = config.gradient.clip_score_weight
    return config.reward.spec + (f",clip_score:{weight:g}" if weight > 0 else "")


def check_differentiable(config: TexForceConfig) -> None:
    """A gradient learner needs every part of its reward to pass gradients to the images; ConfigError names the fix."""
    import rewards

    bad = [name for name, _ in rewards.parse_spec(reward_spec(config)) if not rewards.get_entry(name).differentiable]
    if bad:
        usable = [entry.name for entry in rewards.list_entries() if entry.differentiable]
        raise ConfigError(
            f"train.algorithm={config.train.algorithm} backpropagates the reward, but {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not differentiable; use a differentiable reward "
            f"({', '.join(usable)}) or train.algorithm=ppo"
        )


@dataclass
class Window:
    """Where the gradient flows in one minibatch's loop of T steps.

    Steps [0, first) run without grad, steps [first, end) with it. stop: score x0_hat predicted
    at step end - 1 (ReFL) instead of the latent after step T - 1. copies: DRaFT-LV's re-noised
    copies (with first = end = T: the loop itself carries no grad). kl_step: the step whose KL
    to the base joins the loss (gradient.kl_coef > 0), one of the steps with grad (DRaFT-LV: T - 1,
    its copies' step), None = no KL term.
    """

    first: int
    end: int
    stop: bool = False
    copies: int = 0
    kl_step: int | None = None

    @property
    def num_grad_steps(self) -> int:
        """The U-Net steps with grad on each path to a scored latent (DRaFT-LV: each copy's one step)."""
        return 1 if self.copies else self.end - self.first


def draw_window(algorithm: Algorithm, config: TexForceConfig, generator: torch.Generator) -> Window:
    """The window of one minibatch (the random ones drawn from `generator`, the same on every rank),
    with its KL step, uniform over the window's steps with grad, when gradient.kl_coef > 0."""
    window = _draw_steps(algorithm, config, generator)
    if config.gradient.kl_coef > 0:
        if window.copies:
            window.kl_step = config.sample.num_steps - 1
        else:
            window.kl_step = int(torch.randint(window.first, window.end, (1,), generator=generator))
    return window


def _draw_steps(algorithm: Algorithm, config: TexForceConfig, generator: torch.Generator) -> Window:
    g, steps = config.gradient, config.sample.num_steps
    if algorithm.truncation == "copies":
        return Window(steps, steps, copies=g.lv_copies)
    if algorithm.truncation == "all":
        return Window(0, steps)
    if algorithm.truncation == "fixed":
        return Window(steps - g.truncation_k, steps)
    if algorithm.truncation == "fraction":
        return Window(steps - fraction_of_steps(g.textcraftor_fraction, steps), steps)
    if algorithm.truncation == "random":
        k = int(torch.randint(1, (g.alignprop_max_k or steps) + 1, (1,), generator=generator))
        return Window(steps - k, steps)
    if algorithm.truncation == "stop":
        low, high = refl_stop_range(g.refl_min_fraction, g.refl_max_fraction, steps)
        m = int(torch.randint(low, high + 1, (1,), generator=generator))
        return Window(m, m + 1, stop=True)
    raise ValueError(f"algorithm {algorithm.name!r} is not a gradient learner")


def fraction_of_steps(fraction: float, num_steps: int) -> int:
    """max(1, round(fraction x T)), rounding halves up: 0.2 of 25 steps is 5 (TextCraftor's code), of 10 is 2."""
    return max(1, min(num_steps, math.floor(fraction * num_steps + 0.5)))


def refl_stop_range(min_fraction: float, max_fraction: float, num_steps: int) -> tuple[int, int]:
    """[m_min, m_max], the step indices ReFL stops at: floor(fraction * T), the latest capped at T - 1."""
    high = min(num_steps - 1, int(max_fraction * num_steps + 1e-9))
    return min(int(min_fraction * num_steps + 1e-9), high), high


def _decode(vae, latents: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    """[B, 4, h, w] -> [B, 3, H, W] float32 in [0, 1], differentiable; checkpointed: activations recomputed in backward."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(decode_latents, vae, latents, use_reentrant=False)
    return decode_latents(vae, latents)


@dataclass
class ScoredSamples:
    """The samples one rank drew in an update: rows = positions in the epoch's prompt list.

    images: [B, 3, H, W] uint8; scores: [B] float32, the final samples' rewards; parts: name -> [B].
    """

    rows: list[int]
    prompts: list[str]
    images: torch.Tensor
    scores: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list["ScoredSamples"]) -> "ScoredSamples":
        """Concatenate and order by row (the ranks' pieces back into the epoch's order)."""
        rows = [r for p in parts for r in p.rows]
        prompts = [x for p in parts for x in p.prompts]
        order = torch.as_tensor(np.argsort(rows, kind="stable"), dtype=torch.long)
        return ScoredSamples(
            rows=[rows[i] for i in order.tolist()],
            prompts=[prompts[i] for i in order.tolist()],
            images=torch.cat([p.images for p in parts])[order],
            scores=torch.cat([p.scores for p in parts])[order],
            parts={k: torch.cat([p.parts[k] for p in parts])[order] for k in parts[0].parts},
        )


class GradientLearner(LoraLearner):
    """Samples, scores and steps in one pass over prompts and seeds (no samplers, no advantages).

    Every rank gets the epoch's prompts and seeds and takes its rows of each optimizer step from
    `accumulation_plan`, weighting its loss by their share, so L ranks step like one learner on
    the union batch (gradients summed in `optimizer_step`). The reward model lives here: it
    must pass gradients to the images.
    """

    def __init__(self, pipe, config: TexForceConfig, *, world_size: int = 1):
        import rewards

        self.algorithm = get_algorithm(config.train.algorithm)
        if self.algorithm.learner != "gradient":
            raise ValueError(f"train.algorithm={self.algorithm.name} is not a gradient learner")
        check_differentiable(config)
        super().__init__(pipe, config, optimizer_steps_per_epoch=optimizer_steps_per_epoch(config, world_size))
        self.gradient = config.gradient
        self.reward = rewards.build_reward(reward_spec(config), device=pipe.unet.device, paths=config.reward.paths)
        for scorer in self.reward.scorers:  # frozen: gradients flow through, never into, the reward model
            if isinstance(scorer, nn.Module):
                scorer.requires_grad_(False)
        self.schedule = DDIMSchedule.from_scheduler(pipe.scheduler, self.sample.num_steps)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.height, self.width = self.sample.height or size, self.sample.width or size

    # --- the update ------------------------------------------------------------------------

    def update(self, prompts: list[str], seeds: list[int]) -> tuple[dict[str, float], ScoredSamples]:
        """One pass over the epoch's prompts (one sample per prompt and seed): the mean metrics,
        and this rank's samples with their rewards."""
        world, rank = _world_and_rank()
        plan = accumulation_plan(
            len(prompts), batch_size=self.train.batch_size, accumulate=self.train.gradient_accumulation_steps,
            world_size=world, rank=rank,
        )
        history = UpdateHistory()
        samples = []
        for minibatches in plan:
            for begin, end, weight in minibatches:
                window = draw_window(self.algorithm, self.config, self.generator)  # drawn on every rank alike
                if end == begin:
                    continue
                metrics, scored = self.minibatch_backward(prompts[begin:end], seeds[begin:end], window, weight)
                scored.rows = list(range(begin, end))
                samples.append(scored)
                history.minibatch(end - begin, metrics)
            history.step(self.optimizer_step())
        summary = self.finish_update(history)
        if not samples:  # a rank without rows this epoch
            samples = [ScoredSamples([], [], torch.zeros(0, 3, self.height, self.width, dtype=torch.uint8),
                                     torch.zeros(0), {name: torch.zeros(0) for name in self.reward.weights})]
        return summary, ScoredSamples.cat(samples)

    def embeddings(self, prompts: list[str], *, base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) [B, L, D] from the text encoder, with grad when its LoRA trains;
        base: the text encoder with its LoRA off, no grad (TextCraftor's early steps)."""
        prompt_ids = tokenize(self.pipe.tokenizer, prompts)
        negative_ids = tokenize(self.pipe.tokenizer, [self.sample.negative_prompt] * len(prompts))
        if base:
            with torch.no_grad(), adapters_disabled(self.pipe, "text_encoder"):
                return encode(self.pipe.text_encoder, prompt_ids), encode(self.pipe.text_encoder, negative_ids)
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return encode(self.pipe.text_encoder, prompt_ids), encode(self.pipe.text_encoder, negative_ids)

    def loss(self, prompts: list[str], seeds: list[int], window: Window) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """(-reward, averaged over the minibatch [summed over LV copies]; its metrics; the final
        sample x_0 [B, 4, h, w], detached). Non-finite rewards leave the loss and the gradient."""
        cond, uncond = self.embeddings(prompts)
        early = self.embeddings(prompts, base=True) if self.algorithm.original_encoder_early else (cond, uncond)
        run = dict(guidance_scale=self.sample.guidance_scale, eta=0.0, height=self.height, width=self.width)
        # 1. the steps before the window, without grad (TextCraftor: driven by the base text encoder)
        with torch.no_grad():
            latents, _ = denoise(self.pipe, early[0].detach(), early[1].detach(), seeds, self.schedule,
                                 steps=range(0, window.first), **run)
        x = latents[-1]
        kl_latent = x  # x_t at the KL step: ReFL's stop step (set below for the other windows)
        # 2. the window, with grad, each U-Net call checkpointed
        if window.stop:  # ReFL: score x0_hat predicted at the stop step, then finish the sample without grad
            t = torch.full((len(seeds),), int(self.schedule.timesteps[window.first]), device=x.device, dtype=torch.long)
            eps_hat = self.noise_prediction(x, t, cond, uncond)
            scored = [predicted_x0(self.schedule, eps_hat, t, x)]
            with torch.no_grad():
                x = ddim_step_with_logprob(self.schedule, eps_hat.detach(), t, x, eta=0.0)[0]
                x = denoise(self.pipe, cond.detach(), uncond.detach(), seeds, self.schedule, start=x,
                            steps=range(window.end, self.schedule.num_steps), **run)[0][-1]
        else:
            window_latents = denoise(self.pipe, cond, uncond, seeds, self.schedule, start=x,
                                     steps=range(window.first, window.end), checkpoint=self.gradient.checkpointing,
                                     **run)[0]
            if window.kl_step is not None and window.first <= window.kl_step < window.end:
                kl_latent = window_latents[window.kl_step - window.first]
            x = window_latents[-1]
            scored = [x]
        if window.copies:  # DRaFT-LV: n re-noised copies of x_0, each denoised in one step with grad
            last = self.schedule.num_steps - 1
            t = torch.full((len(seeds),), int(self.schedule.timesteps[last]), device=x.device, dtype=torch.long)
            noised = [add_noise(self.schedule, x, noise, t) for noise in self.copy_noise(x, seeds, window.copies)]
            kl_latent = noised[0]
            scored = [
                denoise(self.pipe, cond, uncond, seeds, self.schedule, start=start, steps=range(last, last + 1),
                        checkpoint=self.gradient.checkpointing, **run)[0][-1]
                for start in noised
            ]
        # 3. decode, score, -reward
        terms, metrics = [], {}
        for latent in scored:
            images = _decode(self.pipe.vae, latent, self.gradient.checkpointing)
            output = self.reward(images, prompts)
            finite = torch.isfinite(output.scores)
            if images.requires_grad and not finite.all():
                # the loss takes 0 of a non-finite score, but the reward's backward still gives its image 0 x NaN:
                # zero those rows, or that NaN reaches every LoRA weight
                keep = finite.view(-1, *([1] * (images.dim() - 1)))
                images.register_hook(lambda grad, keep=keep: torch.where(keep, grad, torch.zeros_like(grad)))
            terms.append(-torch.where(finite, output.scores, torch.zeros_like(output.scores)).sum() / len(prompts))
        metrics["reward_trained"] = float(sum(-t.item() for t in terms) / len(terms))
        loss = sum(terms)
        if window.kl_step is not None:
            kl = self.kl_to_base(prompts, kl_latent, window.kl_step, cond, uncond)
            loss = loss + self.gradient.kl_coef * kl
            metrics["kl_to_base"] = kl.item()
        return loss, metrics, x.detach()

    def kl_to_base(self, prompts: list[str], x: torch.Tensor, step: int, cond, uncond) -> torch.Tensor:
        """DPOK's KL regulariser at one step: ||eps_theta(x_t) - eps_base(x_t)||^2, the guided noise
        predictions of the fine-tuned and the base model, mean over latent elements and the batch.

        The KL between the two models' sampling processes is bounded by a weighted sum of this over the
        steps (DPOK, Fan et al. 2023); one step drawn uniformly from the window estimates its mean over
        the window without bias at the cost of two U-Net calls. x_t is detached, as in DPOK: the
        gradient moves the model's prediction at the states it visits, not the states themselves.
        """
        x = x.detach()
        t = torch.full((len(prompts),), int(self.schedule.timesteps[step]), device=x.device, dtype=torch.long)
        eps = self.noise_prediction(x, t, cond, uncond)
        with torch.no_grad(), adapters_disabled(self.pipe, self.policy):
            base_cond, base_uncond = self.embeddings(prompts)
            base_eps = guided_noise_prediction(self.pipe.unet, x, t, base_cond, base_uncond, self.sample.guidance_scale)
        return ((eps.float() - base_eps.float()) ** 2).flatten(1).mean(1).mean()

    def noise_prediction(self, x: torch.Tensor, t: torch.Tensor, cond, uncond) -> torch.Tensor:
        """The guided eps_hat at x_t (ReFL's stop step), checkpointed like the loop's U-Net calls."""
        args = (self.pipe.unet, x, t, cond, uncond, self.sample.guidance_scale)
        if self.gradient.checkpointing:
            return checkpoint(guided_noise_prediction, *args, use_reentrant=False)
        return guided_noise_prediction(*args)

    @staticmethod
    def copy_noise(x0: torch.Tensor, seeds: list[int], copies: int) -> list[torch.Tensor]:
        """DRaFT-LV's re-noising draws, [B, C, h, w] per copy, each sample's from its own seed."""
        return [
            torch.stack([
                torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s) * 7919 + copy + 1))
                for s in seeds
            ]).to(x0.device)
            for copy in range(copies)
        ]

    def minibatch_backward(
        self, prompts: list[str], seeds: list[int], window: Window, weight: float = 1.0
    ) -> tuple[dict[str, float], ScoredSamples]:
        """Accumulate d(loss)/d(LoRA) x weight (x the fp16 loss scale) into `.grad`; the metrics
        and the minibatch's final samples with their rewards (scored without grad)."""
        loss, metrics, x0 = self.loss(prompts, seeds, window)
        (loss * (weight * self.scaler.scale)).backward()
        with torch.no_grad():
            images = decode_latents(self.pipe.vae, x0)
            output = self.reward(images, prompts)
        metrics |= {"loss": loss.item(), "grad_steps": float(window.num_grad_steps)}
        if window.stop:
            metrics["refl_stop_step"] = float(window.first)
        scored = ScoredSamples(
            rows=[], prompts=list(prompts), images=images_to_uint8(images).cpu(), scores=output.scores.float().cpu(),
            parts={k: v.float().cpu() for k, v in output.parts.items()},
        )
        return metrics, scored

"""The PPO learner's cost per minibatch against its ideal, and against re-encoding at every step.

On one stored minibatch (text-encoder LoRA, the demo's trained steps), timed alternately after a
warm-up, median of --repeats:

- learner: `PPOLearner.minibatch_backward` (log-prob recomputation, PPO loss, backward; the
  encoder once per minibatch) plus its optimizer step;
- ideal: the work it cannot avoid: per trained step one guided U-Net forward + backward to the
  embeddings, then one text-encoder forward + backward, and the optimizer step;
- re-encode: the TexForce/TRL way, encoding the prompts again at every trained step and
  backpropagating through the encoder each time.

The issue's targets: learner at most 1.15x its ideal; once-per-minibatch encoding measurably
faster than re-encoding (the gap grows with the encoder's share, small for the toy model's
encoder and large for SD's CLIP ViT-L).

    python bench/learner_overhead.py models/toy-sd --batch 64 --repeats 7
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=64, help="rows per minibatch (the demo's train.batch_size)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/bench-learner/learner_overhead.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) on configs/tiny.yaml")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)

    from rl.config import load_config
    from rl.learner import PPOLearner
    from rl.models import load_pipeline
    from rl.ppo import clipped_surrogate_loss
    from rl.sampling import encode, guided_noise_prediction, sample_trajectories, step_distribution

    # the papers' loss: no KL penalty (it adds one U-Net forward per step, to learner and ideal alike)
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={args.model}", "train.kl_coef=0",
                                                          f"train.batch_size={args.batch}", *args.overrides])
    pipe = load_pipeline(args.model, dtype=config.model.dtype, device="auto")
    device = pipe.unet.device
    learner = PPOLearner(pipe, config)
    s = config.sample
    prompts = [f"a {c} ball" for c in ("red", "blue", "green", "yellow")] * (args.batch // 4 + 1)
    batch = sample_trajectories(pipe, prompts[: args.batch], list(range(args.batch)), num_steps=s.num_steps,
                                guidance_scale=s.guidance_scale, eta=s.eta)
    advantages = torch.linspace(-1, 1, args.batch)
    steps = learner.trainable_steps
    step_index = steps.repeat(args.batch, 1)  # every trainable step of every row
    rows = torch.arange(args.batch)
    # the ideal and re-encoding arms read the trajectories from the device; the learner copies its rows there itself
    on_device = dataclasses.replace(batch, latents=batch.latents.to(device), timesteps=batch.timesteps.to(device),
                                    log_probs=batch.log_probs.to(device))
    device_advantages = advantages.to(device)

    def learner_step() -> None:
        learner.minibatch_backward(batch, advantages, step_index)
        learner.optimizer_step()

    def ideal_step() -> None:
        cond = encode(pipe.text_encoder, batch.prompt_ids)
        uncond = encode(pipe.text_encoder, batch.negative_ids)
        cond_leaf, uncond_leaf = cond.detach().requires_grad_(), uncond.detach().requires_grad_()
        for j in steps.tolist():
            eps = guided_noise_prediction(pipe.unet, on_device.latents[:, j], on_device.timesteps[:, j], cond_leaf,
                                          uncond_leaf, s.guidance_scale)
            eps.sum().backward()
        torch.autograd.backward([cond, uncond], [cond_leaf.grad, uncond_leaf.grad])
        learner.optimizer_step()

    def reencode_step() -> None:
        for k in range(step_index.shape[1]):
            j = step_index[:, k]
            cond = encode(pipe.text_encoder, batch.prompt_ids)
            uncond = encode(pipe.text_encoder, batch.negative_ids)
            log_prob, _, _ = step_distribution(pipe.unet, learner.schedule, on_device.latents[rows, j],
                                               on_device.timesteps[rows, j], on_device.latents[rows, j + 1],
                                               cond, uncond, guidance_scale=s.guidance_scale, eta=s.eta)
            loss, _ = clipped_surrogate_loss(log_prob, on_device.log_probs[rows, j], device_advantages,
                                             config.train.clip_range)
            (loss / step_index.shape[1]).backward()
        learner.optimizer_step()

    candidates = {"learner": learner_step, "ideal": ideal_step, "re-encode every step": reencode_step}

    def synchronize() -> None:  # kernels run asynchronously on a GPU: time what they did, not their launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in candidates.values():
        fn()  # warm-up
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(v) for name, v in times.items()}
    print(f"one minibatch of {args.batch} rows x {len(steps)} trained steps (text-encoder LoRA), "
          f"{device}, {config.model.dtype}, {args.threads} threads, median of {args.repeats}, interleaved:")
    for name, median in medians.items():
        print(f"  {name:22s} {median:7.3f} s  ({median / medians['ideal']:.3f}x ideal)")
    ratios = {"learner_over_ideal": medians["learner"] / medians["ideal"],
              "reencode_over_learner": medians["re-encode every step"] / medians["learner"]}
    print(f"  re-encoding / learner  {ratios['reencode_over_learner']:.3f}x")
    ratios["learner_samples_per_s"] = args.batch / medians["learner"]
    print(f"  learner                {ratios['learner_samples_per_s']:7.2f} samples/s "
          f"({len(steps)} trained steps each)")
    if device.type == "cuda":
        ratios["peak_device_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        print(f"  peak device memory     {ratios['peak_device_gib']:7.2f} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                    "medians": medians, **ratios}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

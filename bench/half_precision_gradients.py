"""Cosine of the half-precision LoRA gradient to the float32 one, at SD-sized latents.

The table in docs/half_precision.md comes from this script. One PPO minibatch backward
(`PPOLearner.minibatch_backward`) on the same trajectories, with the frozen weights in float32,
bfloat16, float16 with loss scaling (the learner's default for float16) and float16 without it
(scale 1, what the learner did before loss scaling). LoRA on the text encoder and the U-Net; the
LoRA is moved off zero first so both parts have a gradient.

    texforce make-tiny runs/tiny-sd
    python bench/half_precision_gradients.py runs/tiny-sd --size 256 --num-steps 50 --trained 25

At --size 256 the tiny VAE gives 4x64x64 latents, SD 1.5's latent size at 512x512. float16 runs
slowly on CPU (no fast fp16 convolution kernels): about 12 s per trained step there.
"""
from __future__ import annotations

import argparse
import time

import torch

from rl.config import load_config
from rl.learner import PPOLearner
from rl.lora import set_policy_weights
from rl.models import load_pipeline
from rl.sampling import sample_trajectories

VARIANTS = {  # name -> (model.dtype, loss scaling on)
    "bfloat16": ("bfloat16", True),
    "float16": ("float16", True),
    "float16, no loss scaling": ("float16", False),
}


def _config(model_dir: str, dtype: str, args: argparse.Namespace):
    return load_config(None, [
        f"model.pretrained={model_dir}", f"model.device={args.device}", f"model.dtype={dtype}",
        f"sample.num_steps={args.num_steps}", f"sample.height={args.size}", f"sample.width={args.size}",
        "lora.policy=both", "lora.rank=4", "lora.alpha=4", "train.clip_range=10",
    ])


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten().float() for t in tensors])


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = _flat(a), _flat(b)
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def _gradients(learner: PPOLearner, batch, advantages, step_index) -> list[torch.Tensor]:
    learner.minibatch_backward(batch, advantages, step_index, 1.0)
    grads = [p.grad.detach().clone() for p in learner.params]
    if grads[0].is_cuda:
        torch.cuda.synchronize()
    learner.optimizer.zero_grad(set_to_none=True)
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a diffusers directory, e.g. from `texforce make-tiny`")
    parser.add_argument("--size", type=int, default=256, help="image side; 256 gives 4x64x64 latents on the tiny VAE")
    parser.add_argument("--num-steps", type=int, default=50, help="DDIM steps per trajectory")
    parser.add_argument("--trained", type=int, default=25, help="steps trained (a random subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (all variants and the float32 reference on it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # a float32 reference, not TF32: cuDNN's convolutions round to TF32 by default on Ampere and later
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    generator = torch.Generator().manual_seed(args.seed)
    reference = PPOLearner(load_pipeline(args.model, device=args.device), _config(args.model, "float32", args))
    with torch.no_grad():
        for p in reference.params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator).to(p.device))
    t0 = time.perf_counter()
    batch = sample_trajectories(reference.pipe, ["a red ball"], [args.seed], num_steps=args.num_steps,
                                guidance_scale=5.0, eta=1.0, height=args.size, width=args.size)
    print(f"latents {tuple(batch.latents.shape[2:])}, sampled in {time.perf_counter() - t0:.1f} s", flush=True)
    advantages = torch.tensor([1.0])
    step_index = torch.randperm(args.num_steps, generator=generator)[: args.trained][None]
    num_te = sum(1 for name, _ in reference.pipe.text_encoder.named_parameters() if "lora_" in name)
    exact = _gradients(reference, batch, advantages, step_index)

    print(f"{'frozen weights':26s} {'cos text encoder':>17s} {'cos U-Net':>10s} {'seconds':>8s}")
    for name, (dtype, scaled) in VARIANTS.items():
        pipe = load_pipeline(args.model, dtype=dtype, device=args.device)
        learner = PPOLearner(pipe, _config(args.model, dtype, args))
        set_policy_weights(learner.pipe, reference.get_weights())
        if not scaled:
            learner.scaler.scale = 1.0
        t0 = time.perf_counter()
        grads = _gradients(learner, batch, advantages, step_index)
        seconds = time.perf_counter() - t0
        print(f"{name:26s} {_cosine(grads[:num_te], exact[:num_te]):17.4f} "
              f"{_cosine(grads[num_te:], exact[num_te:]):10.4f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()

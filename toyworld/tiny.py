"""The toy world's model: a tiny Stable Diffusion pipeline built offline, in the real diffusers layout.

Tests and the embedded demo load it with `StableDiffusionPipeline.from_pretrained(DIR)`,
the same path that loads SD 1.x/2.x weights, so nothing is mocked. Weights are random but
deterministic from the seed; the tokenizer is a byte-level BPE generated here (every string
tokenizes; the words in `_WORDS` become single tokens).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rl.models  # noqa: F401  (before diffusers loads: drops transformers' advice to install torchvision)
from rl.cli import DefaultsHelpFormatter
from rl.config import ConfigError  # a user error: one line on stderr, exit code 2 (rl.cli)
from toyworld.captions import COLORS, SHAPES, all_combinations, train_combinations

_WORDS = COLORS + (
    "a an the of on in with and photo picture painting of cat dog bird car ball house tree flower apple "
    "boat cup hat chair sky grass sea field street table wall horse fish dragon robot city forest"
).split()
assert set(SHAPES) <= set(_WORDS), "every caption word is one token"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def make_tokenizer_files(words: list[str] = _WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocab (bytes, bytes + '</w>', merged words, specials) and its merges."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merge = (left, right)
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(left + right)
            left = left + right
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def toy_tokenizer():
    """CLIP's BPE tokenizer over the toy world's words, SD's prompt length (77)."""
    from transformers import CLIPTokenizer

    vocab, merges = make_tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def sd_ddim_scheduler():
    """Stable Diffusion 1.x's noise schedule (scaled linear betas 0.00085-0.012), as DDIM."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(seed: int = 0):
    """Tiny SD: U-Net (32, 64), VAE with 3 blocks (64x64 images from 16x16 latents), CLIP hidden 32."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


SCENE_SETS = {"all": all_combinations, "train": train_combinations}  # --scenes: which (colour, shape) pairs


def make_tiny(directory: str | Path, seed: int = 0, *, pretrain_steps: int = 0, vae_steps: int | None = None,
              scenes: str = "all", progress: bool = False) -> Path:  # fmt: skip
    """Build the tiny pipeline, optionally pretrain it on synthetic scenes, and `save_pretrained` it.

    pretrain_steps = 0 keeps the random weights (the test suite's model). N > 0 runs
    `toyworld.pretrain.pretrain_tiny` with `vae_steps` (default N // 3) VAE steps and N - vae_steps
    U-Net + text-encoder steps, after which the prompt's colour word controls the image colour (the embedded demo's
    model). scenes: "all" pairs of colour and shape, or only the "train" pairs
    (`toyworld.captions`), so the held-out pairs are never seen.
    """
    directory = Path(directory)
    pipe = build_tiny_pipeline(seed)
    if pretrain_steps > 0:
        from toyworld.pretrain import pretrain_tiny

        vae_steps = pretrain_steps // 3 if vae_steps is None else vae_steps
        pretrain_tiny(
            pipe, vae_steps=vae_steps, unet_steps=pretrain_steps - vae_steps, seed=seed,
            combinations=SCENE_SETS[scenes](), progress=progress,
        )  # fmt: skip
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Writing model shards" bar for a 1-file, 5 MB text encoder
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("make-tiny", formatter_class=DefaultsHelpFormatter,
                            help="build a tiny Stable Diffusion pipeline offline into DIR")
    parser.add_argument("directory", help="output directory (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (and the pretraining)")
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=0,
        metavar="N",
        help="0 (default): random weights, the prompt has no effect. N > 0: pretrain on synthetic scenes "
        "('a red ball') so the caption's words steer the image: N//3 VAE steps, then N - N//3 U-Net + "
        "text-encoder steps (batches of 16 and 32). The demo's committed model: N=4000 with --vae-steps 1000 "
        "--scenes train (`make toy-model`, ~13 min on 2 CPU cores).",
    )
    parser.add_argument("--vae-steps", type=int, default=None, metavar="M",
                        help="of the N pretraining steps, M train the VAE (default N//3)")
    parser.add_argument(
        "--scenes",
        choices=sorted(SCENE_SETS),
        default="all",
        help="which (colour, shape) pairs the pretraining draws: all 80 (default), or the 60 'train' pairs "
        "so the 20 held-out pairs of toyworld.captions are never seen",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    if args.pretrain_steps < 0:
        raise ConfigError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    if args.vae_steps is not None and args.pretrain_steps == 0:
        raise ConfigError(f"--vae-steps {args.vae_steps} needs --pretrain-steps: the VAE's steps are the first of the "
                          "pretraining's (without it the model is left random); pass --pretrain-steps N above it")
    if args.vae_steps is not None and not 0 <= args.vae_steps < args.pretrain_steps:
        raise ConfigError(f"--vae-steps must be in [0, --pretrain-steps), got {args.vae_steps}")
    if (Path(args.directory) / "model_index.json").exists():  # save_pretrained would overwrite it file by file
        raise ConfigError(f"{args.directory} holds a diffusers model already; remove it or choose another directory")
    from rl.output_lock import claim_output_dir
    from rl.run_dir import make_output_dir

    make_output_dir(args.directory, "directory")  # before the pretraining, which it would lose
    claim_output_dir(args.directory, "directory")
    path = make_tiny(args.directory, seed=args.seed, pretrain_steps=args.pretrain_steps, vae_steps=args.vae_steps,
                     scenes=args.scenes, progress=True)  # fmt: skip
    kind = f"pretrained ({args.pretrain_steps} steps)" if args.pretrain_steps else "random"
    print(f"tiny Stable Diffusion pipeline ({kind}) written to {path}")
    return 0

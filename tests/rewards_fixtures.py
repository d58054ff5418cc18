"""Tiny random-weight reward models written in the official file formats and layouts.

Every file is written the way the official one is laid out (ImageReward.pt + med_config.json,
HPS_v2*_compressed.pt as an OpenCLIP state dict under "state_dict", CLIPModel directories,
the LAION head .pth, tokenizer directories), and the code under test loads them exactly as a
user's files. The official key names are spelled out here independently of the mapping code
in `rewards/`, so a wrong mapping cannot agree with itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "ball", "car", "dog", "cat", "grass", "sky", "house", "tree", "person", "face", "red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple", "pink", "brown", "gray", "beautiful"]

# Tiny sizes, with the official head widths (BLIP ViT 64, OpenCLIP ViT-H-14 vision 80 / text 64).
BLIP_VISION = dict(width=64, depth=2, patch=8, image=32)
BLIP_TEXT = dict(hidden=32, layers=2, heads=2, intermediate=64, max_pos=64)
HEAD_SIZES = (64, 32, 16, 8)  # official: 1024, 128, 64, 16
OPENCLIP = dict(vision_width=160, vision_layers=2, patch=8, image=32, text_width=64, text_layers=2,
                context=77, embed=32)
HF_CLIP = dict(hidden=32, layers=2, heads=2, intermediate=64, patch=8, image=32, projection=24)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2/CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(directory: Path) -> Path:
    """A CLIP tokenizer directory (vocab.json + merges.txt) with whole-word merges for WORDS."""
    from transformers import CLIPTokenizer

    raw = directory / "raw"
    raw.mkdir(parents=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
                vocab.append(pair[0] + pair[1])
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = list(dict.fromkeys(vocab))
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(raw), local_files_only=True, model_max_length=77)
    out = directory / "clip_tokenizer"
    tokenizer.save_pretrained(str(out))
    return out


def write_bert_tokenizer(directory: Path) -> Path:
    """A bert-base-uncased-style tokenizer directory built from a generated vocab.txt."""
    from transformers import BertTokenizer

    raw = directory / "raw_bert"
    raw.mkdir(parents=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")
    tokens += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + list(WORDS)
    (raw / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(raw), local_files_only=True)
    out = directory / "bert_tokenizer"
    tokenizer.save_pretrained(str(out))
    return out


def _rand(gen: torch.Generator, *shape: int, std: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _norm(gen: torch.Generator, prefix: str, dim: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + _rand(gen, dim, std=0.05), f"{prefix}.bias": _rand(gen, dim, std=0.05)}


def _linear(gen: torch.Generator, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, torch.Tensor]:
    sd = {f"{prefix}.weight": _rand(gen, out_dim, in_dim, std=in_dim ** -0.5)}
    if bias:
        sd[f"{prefix}.bias"] = _rand(gen, out_dim, std=0.02)
    return sd


def head_state_dict(gen: torch.Generator, in_dim: int, prefix: str = "layers") -> dict[str, torch.Tensor]:
    """The official MLP head: Linear at Sequential indices 0, 2, 4, 6, 7 (dropouts between)."""
    sizes = (in_dim,) + HEAD_SIZES + (1,)
    sd = {}
    for index, (i, o) in zip((0, 2, 4, 6, 7), pairwise(sizes)):
        sd.update(_linear(gen, f"{prefix}.{index}", o, i))
    return sd


def imagereward_state_dict(gen: torch.Generator, vocab: int) -> dict[str, torch.Tensor]:
    """`ImageReward.pt` layout: ImageReward(blip=BLIP_Pretrain(visual_encoder, text_encoder, vision_proj,
    text_proj), mlp=MLP) with BLIP's timm-style ViT and med.py BERT."""
    w, p, n = BLIP_VISION["width"], BLIP_VISION["patch"], (BLIP_VISION["image"] // BLIP_VISION["patch"]) ** 2
    h, i_dim = BLIP_TEXT["hidden"], BLIP_TEXT["intermediate"]
    v = "blip.visual_encoder"
    sd = {f"{v}.cls_token": _rand(gen, 1, 1, w), f"{v}.pos_embed": _rand(gen, 1, n + 1, w),
          f"{v}.patch_embed.proj.weight": _rand(gen, w, 3, p, p, std=0.1), f"{v}.patch_embed.proj.bias": _rand(gen, w)}
    for b in range(BLIP_VISION["depth"]):
        blk = f"{v}.blocks.{b}"
        sd.update(_norm(gen, f"{blk}.norm1", w))
        sd.update(_linear(gen, f"{blk}.attn.qkv", 3 * w, w))
        sd.update(_linear(gen, f"{blk}.attn.proj", w, w))
        sd.update(_norm(gen, f"{blk}.norm2", w))
        sd.update(_linear(gen, f"{blk}.mlp.fc1", 4 * w, w))
        sd.update(_linear(gen, f"{blk}.mlp.fc2", w, 4 * w))
    sd.update(_norm(gen, f"{v}.norm", w))
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.position_ids"] = torch.arange(BLIP_TEXT["max_pos"]).expand(1, -1).clone()
    sd[f"{t}.embeddings.word_embeddings.weight"] = _rand(gen, vocab, h, std=0.5)
    sd[f"{t}.embeddings.position_embeddings.weight"] = _rand(gen, BLIP_TEXT["max_pos"], h)
    sd.update(_norm(gen, f"{t}.embeddings.LayerNorm", h))
    for layer in range(BLIP_TEXT["layers"]):
        lp = f"{t}.encoder.layer.{layer}"
        for att, kv_dim in (("attention", h), ("crossattention", w)):
            sd.update(_linear(gen, f"{lp}.{att}.self.query", h, h))
            sd.update(_linear(gen, f"{lp}.{att}.self.key", h, kv_dim))
            sd.update(_linear(gen, f"{lp}.{att}.self.value", h, kv_dim))
            sd.update(_linear(gen, f"{lp}.{att}.output.dense", h, h))
            sd.update(_norm(gen, f"{lp}.{att}.output.LayerNorm", h))
        sd.update(_linear(gen, f"{lp}.intermediate.dense", i_dim, h))
        sd.update(_linear(gen, f"{lp}.output.dense", h, i_dim))
        sd.update(_norm(gen, f"{lp}.output.LayerNorm", h))
    sd.update(_linear(gen, "blip.vision_proj", 256, w))
    sd.update(_linear(gen, "blip.text_proj", 256, h))
    sd.update(head_state_dict(gen, h, prefix="mlp.layers"))
    return sd


def med_config(vocab: int) -> dict:
    """`med_config.json` as shipped with ImageReward, at tiny sizes."""
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": BLIP_TEXT["hidden"], "initializer_range": 0.02,
        "intermediate_size": BLIP_TEXT["intermediate"], "layer_norm_eps": 1e-12,
        "max_position_embeddings": BLIP_TEXT["max_pos"], "model_type": "bert",
        "num_attention_heads": BLIP_TEXT["heads"], "num_hidden_layers": BLIP_TEXT["layers"], "pad_token_id": 0,
        "type_vocab_size": 2, "vocab_size": vocab, "encoder_width": 768, "add_cross_attention": True,
    }


def openclip_state_dict(gen: torch.Generator, vocab: int) -> dict[str, torch.Tensor]:
    """An OpenCLIP `CLIP` state dict (ViT vision tower, built-in text tower), as in HPS_v2*_compressed.pt."""
    c = OPENCLIP
    vw, tw, e = c["vision_width"], c["text_width"], c["embed"]
    n = (c["image"] // c["patch"]) ** 2
    sd = {"visual.class_embedding": _rand(gen, vw), "visual.positional_embedding": _rand(gen, n + 1, vw),
          "visual.proj": _rand(gen, vw, e, std=vw ** -0.5),
          "visual.conv1.weight": _rand(gen, vw, 3, c["patch"], c["patch"], std=0.1)}
    sd.update(_norm(gen, "visual.ln_pre", vw))

    def blocks(prefix: str, width: int, layers: int) -> None:
        for b in range(layers):
            blk = f"{prefix}transformer.resblocks.{b}"
            sd.update(_norm(gen, f"{blk}.ln_1", width))
            sd[f"{blk}.attn.in_proj_weight"] = _rand(gen, 3 * width, width, std=width ** -0.5)
            sd[f"{blk}.attn.in_proj_bias"] = _rand(gen, 3 * width, std=0.02)
            sd.update(_linear(gen, f"{blk}.attn.out_proj", width, width))
            sd.update(_norm(gen, f"{blk}.ln_2", width))
            sd.update(_linear(gen, f"{blk}.mlp.c_fc", 4 * width, width))
            sd.update(_linear(gen, f"{blk}.mlp.c_proj", width, 4 * width))

    blocks("visual.", vw, c["vision_layers"])
    sd.update(_norm(gen, "visual.ln_post", vw))
    sd["token_embedding.weight"] = _rand(gen, vocab, tw, std=0.5)
    sd["positional_embedding"] = _rand(gen, c["context"], tw)
    blocks("", tw, c["text_layers"])
    sd.update(_norm(gen, "ln_final", tw))
    sd["text_projection"] = _rand(gen, tw, e, std=tw ** -0.5)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


def write_clip_model(directory: Path, tokenizer_dir: Path | None, vocab: int, eos: int, seed: int) -> Path:
    """A transformers CLIPModel directory (as PickScore_v1 / openai CLIP on the hub)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    c = HF_CLIP
    torch.manual_seed(seed)
    common = dict(hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
                  num_attention_heads=c["heads"], hidden_act="gelu")
    config = CLIPConfig(
        text_config=dict(common, vocab_size=vocab, max_position_embeddings=77, eos_token_id=eos, bos_token_id=eos - 1,
                         pad_token_id=eos),
        vision_config=dict(common, image_size=c["image"], patch_size=c["patch"]),
        projection_dim=c["projection"],
    )
    model = CLIPModel(config)
    with torch.no_grad():  # spread the weights so different inputs give clearly different scores
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0, param.shape[-1] ** -0.5)
    model.save_pretrained(str(directory))
    if tokenizer_dir is not None:
        CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True).save_pretrained(str(directory))
    return directory


@dataclass
class TinyRewardFiles:
    """Paths of the tiny models; `paths` is what a user passes to `build_reward`."""

    root: Path
    paths: dict[str, str]
    clip_tokenizer: Path
    bert_tokenizer: Path


@pytest.fixture(scope="session")
def tiny_reward_files(tmp_path_factory) -> TinyRewardFiles:
    from transformers import CLIPTokenizer

    root = tmp_path_factory.mktemp("reward_models")
    gen = torch.Generator().manual_seed(0)
    clip_tok = write_clip_tokenizer(root)
    bert_tok = write_bert_tokenizer(root)
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(clip_tok), local_files_only=True)
    clip_vocab = len(clip_tokenizer)

    ir_dir = root / "imagereward"
    ir_dir.mkdir()
    bert_vocab = len(WORDS) + 80  # room for the generated vocabulary plus [DEC]/[ENC]
    torch.save(imagereward_state_dict(gen, bert_vocab), ir_dir / "ImageReward.pt")
    (ir_dir / "med_config.json").write_text(json.dumps(med_config(bert_vocab), indent=2))

    hps_dir = root / "hps"
    hps_dir.mkdir()
    torch.save({"state_dict": openclip_state_dict(gen, clip_vocab)}, hps_dir / "HPS_v2_compressed.pt")
    torch.save({"state_dict": openclip_state_dict(gen, clip_vocab)}, hps_dir / "HPS_v2.1_compressed.pt")

    eos = clip_tokenizer.eos_token_id
    pick_dir = write_clip_model(root / "PickScore_v1", None, clip_vocab, eos, seed=1)
    clip_dir = write_clip_model(root / "clip-vit", clip_tok, clip_vocab, eos, seed=2)
    aes_dir = root / "aesthetic"
    aes_dir.mkdir()
    torch.save(head_state_dict(gen, HF_CLIP["projection"]), aes_dir / "sac+logos+ava1-l14-linearMSE.pth")

    paths = {
        "imagereward": str(ir_dir / "ImageReward.pt"),  # med_config.json is found next to it
        "imagereward_tokenizer": str(bert_tok),
        "hpsv2": str(hps_dir),  # a directory: HPS_v2_compressed.pt is looked up inside
        "hpsv2_1": str(hps_dir / "HPS_v2.1_compressed.pt"),
        "hps_tokenizer": str(clip_tok),
        "pickscore": str(pick_dir),
        "pickscore_tokenizer": str(clip_tok),
        "clip_score": str(clip_dir),  # its tokenizer is inside the model directory
        "aesthetic": str(aes_dir / "sac+logos+ava1-l14-linearMSE.pth"),
        "aesthetic_clip": str(clip_dir),
    }
    return TinyRewardFiles(root=root, paths=paths, clip_tokenizer=clip_tok, bert_tokenizer=bert_tok)

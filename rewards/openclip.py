"""Map an OpenCLIP (ViT) state dict onto transformers' `CLIPModel`.

`open_clip_torch` needs torchvision, which does not work on this stack; the architectures
are the same pre-norm ViT + causal text transformer, so the weights move over by name:

| OpenCLIP                                   | transformers CLIPModel                          |
|--------------------------------------------|-------------------------------------------------|
| visual.conv1.weight                        | vision_model.embeddings.patch_embedding.weight  |
| visual.class_embedding                     | vision_model.embeddings.class_embedding         |
| visual.positional_embedding `[N+1,W]`      | vision_model.embeddings.position_embedding.weight |
| visual.ln_pre / visual.ln_post             | vision_model.pre_layrnorm / post_layernorm      |
| visual.proj `[W,E]`                        | visual_projection.weight `[E,W]` (transposed)   |
| token_embedding / positional_embedding     | text_model.embeddings.token/position_embedding  |
| ln_final                                   | text_model.final_layer_norm                     |
| text_projection `[W,E]`                    | text_projection.weight `[E,W]` (transposed)     |
| *.resblocks.i.ln_1 / ln_2                  | *.encoder.layers.i.layer_norm1 / layer_norm2    |
| *.resblocks.i.attn.in_proj_weight `[3W,W]` | *.self_attn.q_proj / k_proj / v_proj (split)    |
| *.resblocks.i.attn.out_proj                | *.self_attn.out_proj                            |
| *.resblocks.i.mlp.c_fc / c_proj            | *.mlp.fc1 / fc2                                 |
| logit_scale                                | logit_scale                                     |

Head counts are not stored in the weights; they come from the architecture's head width.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from rewards.checkpoint import reject_unmapped, require_keys

REQUIRED_KEYS = (
    "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
    "token_embedding.weight", "positional_embedding", "text_projection", "logit_scale",
)
# Buffers some OpenCLIP versions saved; they are rebuilt, not loaded.
_IGNORED = {"attn_mask", "visual.attn_mask"}

_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.ln_1\.weight$")
    return len([k for k in state_dict if pattern.match(k)])


def openclip_config(
    state_dict: dict[str, torch.Tensor],
    *,
    vision_head_width: int,
    text_head_width: int,
    hidden_act: str,
    eos_token_id: int,
    bos_token_id: int,
    pad_token_id: int,
    path: Path,
    what: str,
):
    """Infer a `CLIPConfig` from the tensor shapes of an OpenCLIP state dict."""
    from transformers import CLIPConfig

    require_keys(state_dict, REQUIRED_KEYS, path=path, what=what)
    conv = state_dict["visual.conv1.weight"]  # [W, 3, p, p]
    width, patch = conv.shape[0], conv.shape[-1]
    n_pos = state_dict["visual.positional_embedding"].shape[0]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{path}: visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
    vision_layers = _count_blocks(state_dict, "visual.")
    text_layers = _count_blocks(state_dict, "")
    vocab, text_width = state_dict["token_embedding.weight"].shape
    embed_dim = state_dict["visual.proj"].shape[1]
    if state_dict["text_projection"].shape[1] != embed_dim:
        raise ValueError(f"{path}: visual.proj and text_projection project to different sizes")
    if width % vision_head_width or text_width % text_head_width:
        raise ValueError(
            f"{path}: widths {width}/{text_width} are not multiples of the head widths "
            f"{vision_head_width}/{text_head_width} of {what}"
        )
    vision = dict(
        hidden_size=width, intermediate_size=state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=vision_layers, num_attention_heads=width // vision_head_width,
        image_size=grid * patch, patch_size=patch, hidden_act=hidden_act, layer_norm_eps=1e-5,
        projection_dim=embed_dim,
    )
    text = dict(
        hidden_size=text_width, intermediate_size=state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=text_layers, num_attention_heads=text_width // text_head_width,
        vocab_size=vocab, max_position_embeddings=state_dict["positional_embedding"].shape[0],
        hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=embed_dim,
        eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=pad_token_id,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def openclip_to_hf(state_dict: dict[str, torch.Tensor], *, path: Path, what: str) -> dict[str, torch.Tensor]:
    """Rename (and split/transpose) OpenCLIP keys to `CLIPModel` keys; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        match = _BLOCK.match(key)
        if not match:
            unmapped.append(key)
            continue
        tower = "vision_model" if match.group(1) else "text_model"
        prefix = f"{tower}.encoder.layers.{match.group(2)}."
        rest = match.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module in _BLOCK_PARTS:
            out[f"{prefix}{_BLOCK_PARTS[module]}.{param}"] = value
        else:
            unmapped.append(key)
    reject_unmapped(unmapped, path=path, what=what)
    return out

"""Reading and writing LoRA files: the key formats diffusers loads, parsed into per-module factors.

A LoRA adapts a module with `deltaW = scale * up @ down`:

| name  | peft   | diffusers           | shape (Linear) | shape (Conv2d)       |
|-------|--------|---------------------|----------------|----------------------|
| down  | lora_A | lora.down / lora_linear_layer.down | [r, in] | [r, in, kh, kw] |
| up    | lora_B | lora.up / lora_linear_layer.up     | [out, r] | [out, r, 1, 1] |

`scale` comes from, in this order: a kohya `.alpha` tensor (alpha / r); the peft config that
diffusers stores in the safetensors metadata key `lora_adapter_metadata` (`lora_alpha / r`,
with `alpha_pattern`, or `lora_alpha / sqrt(r)` with rsLoRA); otherwise 1 (alpha = rank),
which is what `pipe.load_lora_weights` assumes for a file without either.

Read formats: peft (`lora_A`/`lora_B`), diffusers (`lora.down`/`lora_linear_layer.down`), the
legacy attention-processor keys (`processor.to_q_lora.down`), kohya (`lora_unet_...`, through
diffusers' own converter). Written format: peft keys with a `lora_adapter_metadata` entry.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads the peft config from
PROVENANCE_KEY = "texforce_fusion"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet")

# (regex on the key after the component prefix, which factor) -> module name is group 1
_FACTOR_PATTERNS = [
    (re.compile(r"^(.+)\.lora_A(?:\.[A-Za-z0-9_]+)?\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_B(?:\.[A-Za-z0-9_]+)?\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora_linear_layer\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora_linear_layer\.up\.weight$"), "up"),
    (re.compile(r"^(.+)\.lora\.down\.weight$"), "down"),
    (re.compile(r"^(.+)\.lora\.up\.weight$"), "up"),
]
_LEGACY = re.compile(r"^(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LEGACY_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_LEGACY_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class LoraFormatError(ValueError):
    """A LoRA file that cannot be parsed into (down, up) pairs, or LoRAs that do not fit together
    or do not fit the base model (a user error: one line, exit code 2)."""


class LoraNotFoundError(LoraFormatError, FileNotFoundError):
    """A LoRA path that names no LoRA file."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: `deltaW = scale * up @ down`.

    down: [r, in] or [r, in, kh, kw]; up: [out, r] or [out, r, 1, 1]; scale: a float.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def delta_shape(self) -> tuple[int, ...]:
        """The adapted weight's shape: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        """deltaW = scale * up @ down, float32, shaped like the adapted weight."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # [out, in * kh * kw]
        return (self.scale * product).reshape(self.delta_shape)


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file. modules: full name ("unet.down_blocks.1....to_q") -> LoraModule."""

    path: str
    modules: dict[str, LoraModule]

    @property
    def name(self) -> str:
        return Path(self.path).name if Path(self.path).name != LORA_WEIGHTS_NAME else str(Path(self.path).parent.name)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes: what says a LoRA (or any weights file) is the one a result came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_lora_path(path: str | Path) -> Path:
    """A `.safetensors` file, or a directory holding `pytorch_lora_weights.safetensors`."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidate = path / LORA_WEIGHTS_NAME
        if not candidate.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise LoraNotFoundError(
                f"LoRA directory {path} has no {LORA_WEIGHTS_NAME}"
                + (f"; pass one of its files instead: {found}" if found else "")
            )
        return candidate
    if not path.is_file():
        raise LoraNotFoundError(
            f"LoRA file not found: {path} (a .safetensors file or a directory written by save_lora)"
        )
    if path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: only .safetensors LoRA files are read (pickled .bin/.pt are not)")
    return path


def read_lora(path: str | Path) -> LoraFile:
    """Parse a LoRA file into per-module (down, up, scale); see the module docstring for formats."""
    from safetensors import SafetensorError, safe_open

    file = resolve_lora_path(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise LoraFormatError(f"{file} is not a readable safetensors file ({error}); copy or export it again") from None
    return parse_state_dict(tensors, metadata, source=str(file))


def parse_state_dict(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, source: str) -> LoraFile:
    """Group a LoRA state dict into modules; `source` names the file in errors."""
    if not tensors:
        raise LoraFormatError(f"{source} holds no tensors")
    alphas: dict[str, float] = {}
    if all(k.startswith(("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")) for k in tensors):
        tensors, alphas = _from_kohya(tensors, source)
    elif not any(k.split(".", 1)[0] in COMPONENTS for k in tensors):
        _refuse_a_text_encoders_unprefixed_keys(tensors, source)
        tensors = {f"unet.{k}": v for k, v in tensors.items()}  # legacy U-Net-only attention-processor files
    try:
        config = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    except json.JSONDecodeError:
        raise LoraFormatError(f"{source}: its {METADATA_KEY!r} metadata is not JSON") from None
    if any(config.get(f"{c}.use_dora") for c in COMPONENTS):
        raise LoraFormatError(f"{source} is a DoRA adapter: its update is not a weight delta that can be summed")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        module, factor = _split_key(key, source)
        factors.setdefault(module, {})[factor] = value
    modules = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"down", "up"}:
            raise LoraFormatError(f"{source}: module {module} has only its {'/'.join(pair)} matrix")
        down, up = pair["down"], pair["up"]
        if down.shape[0] != up.shape[1]:
            raise LoraFormatError(
                f"{source}: module {module} has down {tuple(down.shape)} and up {tuple(up.shape)} of different ranks"
            )
        # a NaN or inf weight would load and turn every image black: the file is broken (a diverged run's save)
        broken = [name for name, factor in pair.items() if not bool(torch.isfinite(factor).all())]
        if broken:
            raise LoraFormatError(f"{source}: module {module} has NaN or inf values in its {broken[0]} matrix; "
                                  "export it again, or use a checkpoint saved before its training diverged")
        scale = _scale(module, down.shape[0], alphas, config)
        if not math.isfinite(scale):
            raise LoraFormatError(f"{source}: module {module} has a non-finite scale (its alpha / rank is {scale})")
        modules[module] = LoraModule(down=down, up=up, scale=scale)
    return LoraFile(path=source, modules=modules)


TEXT_ENCODER_ROOTS = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm.")
"""How a CLIP text encoder's own module names begin (with and without transformers 4's `text_model.` level)."""


def _refuse_a_text_encoders_unprefixed_keys(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Keys without a component prefix are read as the U-Net's (old diffusers attention-processor files); a peft
    adapter's state dict saved as-is (`get_peft_model_state_dict(text_encoder)`, or `adapter_model.safetensors` with
    its `base_model.model.` level) has none either, and read so it would fit no module of the U-Net."""
    key = next(iter(tensors))
    peft_adapter = key.startswith("base_model.model.")
    if not (peft_adapter or key.startswith(TEXT_ENCODER_ROOTS)):
        return
    what = ("a peft adapter file (keys under `base_model.model.`, its scale lora_alpha / r in adapter_config.json, "
            "which the file does not hold)" if peft_adapter else "a text encoder's LoRA without the `text_encoder.` "
            "prefix diffusers' files carry")
    raise LoraFormatError(f"{source}: key {key!r} names no component (unet., text_encoder.): it is {what}; save it "
                          "with diffusers, e.g. StableDiffusionPipeline.save_lora_weights(dir, text_encoder_lora_layers="
                          "get_peft_model_state_dict(pipe.text_encoder)) (unet_lora_layers= for a U-Net's), which writes the "
                          "prefixes and the scale")


def _split_key(key: str, source: str) -> tuple[str, str]:
    """'unet.x.to_q.lora.down.weight' -> ('unet.x.to_q', 'down')."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        raise LoraFormatError(f"{source}: key {key!r} belongs to none of {COMPONENTS}")
    if component != "unet":
        # transformers 5 dropped CLIPTextModel's `text_model.` level; diffusers loads both spellings
        rest = rest.removeprefix("text_model.")
    for pattern, factor in _FACTOR_PATTERNS:
        match = pattern.match(rest)
        if match:
            return f"{component}.{match.group(1)}", factor
    match = _LEGACY.match(rest)
    if match:
        names = _LEGACY_UNET if component == "unet" else _LEGACY_TEXT
        return f"{component}.{match.group(1)}.{names[match.group(2)]}", match.group(3)
    raise LoraFormatError(
        f"{source}: key {key!r} is not a LoRA factor in a format diffusers loads "
        "(expected ...lora_A/lora_B.weight, ...lora.down/up.weight or ...lora_linear_layer.down/up.weight)"
    )


def _from_kohya(tensors: dict[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Kohya keys -> diffusers keys with diffusers' converter; alphas keyed by module name."""
    from diffusers import StableDiffusionPipeline

    converted, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(tensors))
    alphas = {}
    for key, value in (network_alphas or {}).items():
        stem = re.sub(r"(\.down\.weight)?\.alpha$", "", key)
        module, _ = _split_key(stem + ".down.weight", source) if stem.endswith("_lora") else (stem, None)
        alphas[module] = float(value)
    return converted, alphas


def _scale(module: str, rank: int, alphas: dict[str, float], config: dict) -> float:
    """alpha / r from a kohya alpha, else from the peft config in the metadata, else 1."""
    if module in alphas:
        return alphas[module] / rank
    component, _, name = module.partition(".")
    if f"{component}.lora_alpha" not in config:
        return 1.0
    alpha = float(config[f"{component}.lora_alpha"])
    patterns = config.get(f"{component}.alpha_pattern") or {}
    # peft's rule (`get_pattern_key`), as diffusers loads the file: the first pattern that matches the name's end
    matched = next((pattern for pattern in patterns if re.match(rf"(.*\.)?({pattern})$", name)), None)
    if matched is not None:
        alpha = float(patterns[matched])
    if config.get(f"{component}.use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def to_state_dict(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{module: (down, up)} -> peft-format keys (`<module>.lora_A.weight`), which `load_lora_weights` takes."""
    state = {}
    for module, (down, up) in modules.items():
        state[f"{module}.lora_A.weight"] = down.contiguous()
        state[f"{module}.lora_B.weight"] = up.contiguous()
    return state


def adapter_metadata(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object]:
    """The `lora_adapter_metadata` for scale-1 factors: per component r = lora_alpha = the (uniform) rank.

    Every module of a component must have that rank (fusion pads to it), so the file loads
    with scale 1 whatever a loader does with rank patterns.
    """
    config: dict[str, object] = {}
    for component in COMPONENTS:
        names = [m.partition(".")[2] for m in modules if m.partition(".")[0] == component]
        if not names:
            continue
        ranks = {modules[f"{component}.{n}"][0].shape[0] for n in names}
        if len(ranks) != 1:
            raise LoraFormatError(f"{component} modules have ranks {sorted(ranks)}; pad them to one rank first")
        rank = ranks.pop()
        config.update({f"{component}.r": rank, f"{component}.lora_alpha": rank, f"{component}.target_modules": names})
    return config


def lora_output_path(path: str | Path) -> Path:
    """The file `write_lora(..., path)` writes: `path` itself if it ends in .safetensors, else
    `path/pytorch_lora_weights.safetensors`."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / LORA_WEIGHTS_NAME


def write_lora(
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, *, provenance: dict | None = None
) -> Path:
    """Write scale-1 (down, up) factors as a safetensors file that `pipe.load_lora_weights` loads.

    path: a `.safetensors` file, or a directory (then `pytorch_lora_weights.safetensors` in it).
    provenance: JSON-able record (sources, alphas) stored under the metadata key `texforce_fusion`.
    """
    from safetensors.torch import save_file

    from rl.lora import follow_umask

    path = lora_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(adapter_metadata(modules), sort_keys=True)}
    if provenance is not None:
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    save_file({k: v.detach().float().cpu() for k, v in to_state_dict(modules).items()}, str(path), metadata=metadata)
    return follow_umask(path)

"""Safe checkpoint reading and strict loading with errors that name the file.

Only `torch.load(..., weights_only=True)` is used: official reward checkpoints are plain
tensors, and a pickle that needs more than that is refused rather than executed.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

_SHOW = 8  # how many offending keys an error message lists


def _sniff(path: Path) -> str:
    """Guess a file's format from its first bytes, for a helpful error."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch zip"
    if head[:1] == b"\x80":
        return "torch legacy pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.lstrip()[:1] in (b"<",):
        return "HTML/XML text (a web page saved instead of the file?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown binary"


def _keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def read_state_dict(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Read a torch.save'd state dict (optionally wrapped in {"state_dict": ...}).

    what: what the file should be, used in errors (e.g. "ImageReward.pt from THUDM/ImageReward").
    A leading "module." (from DataParallel) is stripped.
    """
    fmt = _sniff(path)
    if fmt not in ("torch zip", "torch legacy pickle"):
        raise ValueError(
            f"{path} is not a PyTorch checkpoint (looks like {fmt}); expected {what}, "
            "a file written by torch.save"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"could not read {path} as a weights-only PyTorch checkpoint ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); expected {what}"
        ) from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; expected {what}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} is not a plain state dict (non-tensor entries: {_keys(map(str, not_tensors))}); "
            f"expected {what}"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def require_keys(state_dict: dict[str, torch.Tensor], keys: Iterable[str], *, path: Path, what: str) -> None:
    """Fail with the file named when keys needed to infer the architecture are absent."""
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ValueError(
            f"{path} does not look like {what}: missing keys {_keys(missing)}; "
            f"it has keys like {_keys(list(state_dict)[:_SHOW])}"
        )


def reject_unmapped(unmapped: Iterable[str], *, path: Path, what: str) -> None:
    """Fail when a checkpoint has keys the key mapping does not know (wrong file or version)."""
    unmapped = list(unmapped)
    if unmapped:
        raise ValueError(f"{path} has keys that do not belong to {what}: {_keys(unmapped)}")


def load_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, path: Path, what: str) -> None:
    """`load_state_dict` that reports missing/unexpected keys and shape errors with the file named."""
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"{path} does not fit {what}: {err}") from err
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {_keys(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {_keys(result.unexpected_keys)}")
    if problems:
        raise ValueError(f"{path} does not match {what}: " + "; ".join(problems))

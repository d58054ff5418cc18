"""Load tokenizers from local directories only, and refuse useless ones.

Offline, `from_pretrained` can silently return a tokenizer with only its special tokens
(design brief §6), which would score every prompt alike; `len(tokenizer)` catches that.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

# Files that make a usable tokenizer directory, per kind (any one group suffices).
_TOKENIZER_FILES = {
    "bert": (("vocab.txt",), ("tokenizer.json",)),
    "clip": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
}
_MIN_TOKENS = 32  # far below any real vocabulary, far above "only special tokens"


def load_tokenizer(path: Path, *, kind: Literal["bert", "clip"], key: str, what: str, vocab_size: int):
    """Load a BERT or CLIP tokenizer from `path` (a directory) and check it is usable.

    key/what: the `paths` key and a description, for the error messages.
    vocab_size: the text model's embedding rows; every token id must be below it.
    """
    from transformers import BertTokenizer, CLIPTokenizer

    groups = _TOKENIZER_FILES[kind]
    if not any(all((path / f).is_file() for f in group) for group in groups):
        wanted = " or ".join("+".join(g) for g in groups)
        raise FileNotFoundError(
            f"no {kind.upper()} tokenizer in {path} (expected {wanted}): provide {what} "
            f"as paths={{{key!r}: '/path/to/tokenizer_dir'}}"
        )
    cls = BertTokenizer if kind == "bert" else CLIPTokenizer
    try:
        tokenizer = cls.from_pretrained(str(path), local_files_only=True)
    except Exception as err:
        raise ValueError(f"could not load a {kind.upper()} tokenizer from {path}: {err}") from err
    if len(tokenizer) < _MIN_TOKENS:
        raise ValueError(
            f"the tokenizer in {path} has only {len(tokenizer)} tokens (its vocabulary did not load); "
            f"provide {what}"
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds only {vocab_size}; "
            f"it is not the tokenizer of this model: provide {what}"
        )
    return tokenizer

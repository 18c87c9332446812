"""Host-side tokenization for SDXL's two text encoders: strings -> fixed-length int32 id rows.

Both encoders use OpenAI CLIP's byte-level BPE (49,408 tokens) with 77 positions: the start
token, up to 75 text tokens, the end token (EOT), then padding. They differ only in the padding
id: CLIP ViT-L/14 (encoder 1, HF tokenizer ``openai/clip-vit-large-patch14``) pads with EOT,
OpenCLIP ViT-bigG/14 (encoder 2, SDXL's ``tokenizer_2``) pads with ``"!"`` = id 0, as OpenCLIP's
own tokenizer pads with zeros. The pooled output of encoder 2 takes the row's argmax id, which is
the EOT with either padding.

The tokenizer is transformers' ``CLIPTokenizer``, read from a diffusers-format folder
(``tokenizer/``, ``tokenizer_2/``) when one is given, otherwise built in memory from the BPE
merges file shipped beside this module (``bpe_simple_vocab_16e6.txt.gz``, MIT licence, see
``LICENSE-CLIP-BPE.txt``). Ids are produced on the host as numpy; the embedding runs in graph.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from gm.errors import ConfigError

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
OPEN_CLIP_PAD_TOKEN = "!"  # id 0: OpenCLIP pads with zeros
MAX_LENGTH = 77
# The merges file holds 262,145 merges; CLIP uses the first 49152 - 256 - 2 so that bytes,
# bytes + "</w>", merges and the two special tokens make a 49,408-entry vocabulary.
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> Dict[int, str]:
    """Byte-level BPE's reversible byte -> printable character map (GPT-2 / CLIP).

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...)
    map to U+0100 onwards in byte order. Dict order = vocabulary order of the 256 base tokens.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=2)
def bpe_vocab_and_merges(path: str = str(BPE_PATH)) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """The CLIP vocabulary (token -> id, 49,408 entries) and merge list from the gzipped BPE file.

    Args:
        path: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (line 0 is a version header).
    Returns:
        ``(vocab, merges)`` in the layout transformers' CLIPTokenizer takes (``vocab=``, ``merges=``).
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408 or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: not OpenAI CLIP's BPE merges file ({len(vocab)} vocabulary entries, expected 49408)")
    return vocab, merges


def build_hf_tokenizer(pad_token: str, max_length: int = MAX_LENGTH, folder: Optional[str | os.PathLike] = None):
    """transformers ``CLIPTokenizer`` from a tokenizer folder or from the shipped BPE file.

    Args:
        pad_token: ``"<|endoftext|>"`` (CLIP-L) or ``"!"`` (OpenCLIP-G); forced even when the folder
            says otherwise, since the encoders were trained with exactly this padding.
        max_length: ids per row (77 for both SDXL encoders).
        folder: a diffusers ``tokenizer/``/``tokenizer_2/`` folder (``vocab.json`` + ``merges.txt``
            or ``tokenizer.json``), or None to build from ``bpe_simple_vocab_16e6.txt.gz``.
    """
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise ImportError("tokenization needs transformers: pip install 'transformers>=4.40'") from err
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConfigError(f"tokenizer folder {folder} does not exist; give a diffusers tokenizer/ or "
                                    "tokenizer_2/ folder, or leave tokenizer_path unset to use the shipped vocabulary")
        return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=max_length)
    # transformers 5 ignores vocab_file=/merges_file= here and silently builds a 2-token tokenizer,
    # so the vocabulary and merges are passed as objects.
    vocab, merges = bpe_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=max_length)


class CLIPTextTokenizer:
    """Strings -> ``(B, max_length)`` int32 ids: SOT, text (truncated to fit), EOT, padding.

    Args:
        pad_token: padding token (``EOT_TOKEN`` for CLIP-L, ``OPEN_CLIP_PAD_TOKEN`` for OpenCLIP-G).
        max_length: row length (77).
        folder: optional diffusers tokenizer folder; the shipped vocabulary otherwise.

    The transformers tokenizer is built on first use, so building a model costs nothing here.
    """

    def __init__(self, pad_token: str = EOT_TOKEN, max_length: int = MAX_LENGTH,
                 folder: Optional[str | os.PathLike] = None):
        self.pad_token = pad_token
        self.max_length = max_length
        self.folder = folder
        self._tokenizer = None

    @property
    def hf_tokenizer(self):
        """The underlying transformers ``CLIPTokenizer`` (built lazily)."""
        if self._tokenizer is None:
            self._tokenizer = build_hf_tokenizer(self.pad_token, self.max_length, self.folder)
        return self._tokenizer

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """Tokenize ``texts`` (a string or a list of B strings) -> (B, max_length) int32."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"prompts must be strings, got {[type(t).__name__ for t in texts]}")
        out = self.hf_tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_attention_mask=False)
        return np.asarray(out["input_ids"], dtype=np.int32).reshape(len(texts), self.max_length)

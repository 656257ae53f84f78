"""The vocabulary of a model, read from its ``tokenizer.json`` (no model, no text): each token id's string and class.

Classes (``TOKEN_CLASSES``), the first rule that applies wins; the tokenizer's metadata is used where it has it,
name patterns otherwise:

* ``padding``: embedding rows no token maps to: ids past the tokenizer's highest id (its size), or holes below it
  (``get_vocab_size`` counts tokens, so a vocabulary with holes has ids at or past it).
* ``unused``: reserved placeholders, by the raw vocabulary piece or its decode: ``<unusedN>`` / ``<unused_N>``
  (Gemma), ``<|reserved_special_token_N|>`` (Llama 3, flagged special there), ``[unusedN]`` (BERT). T5's
  ``<extra_id_N>`` are not here: they are the span-corruption sentinels, trained, so they stay ``special``.
* ``special``: what the metadata marks special: ``added_tokens`` entries with ``"special": true`` and the model's
  unknown token (``model.unk_token``, or ``model.unk_id`` for Unigram); plus added tokens that look like control
  tokens (``<...>``, ``<|...|>``: no spaces) though not flagged, such as Gemma's unflagged markup tokens.
* ``byte``: SentencePiece byte-fallback pieces ``<0xAB>`` (the pattern tokenizers' ByteFallback decoder itself
  reads) and tokens whose decode holds U+FFFD: byte-level BPE (GPT-2, Llama 3) pieces that are an incomplete
  UTF-8 sequence, such as the single byte 0xE2 ('â'); and byte-level tokens of ASCII control characters only
  (0x00-0x08, 0x0E-0x1B, 0x7F: GPT-2's single bytes 'Ā'..'Ĉ', no text either; 0x1C-0x1F count as whitespace).
* ``whitespace``: decodes to a non-empty all-whitespace string (' ', '\\n', '\\t', runs of them: 'Ġ', 'Ċ', '▁▁');
  a bare '▁' counts too where a Strip decoder (Llama 2 style) decodes it to ''.
* ``normal``: everything else.

Why: coherence tests on a feature's top tokens must run on ``normal`` tokens only. String metrics (Levenshtein,
shared stems) find ``<unused1>``..``<unused98>``, byte pieces and whitespace runs "coherent" because they all
read alike, and special tokens are no words; ``padding`` rows hold no token at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from core.errors import WeightFileError

TOKEN_CLASSES = ("normal", "special", "unused", "byte", "whitespace", "padding")

PADDING_TOLERANCE = 0.01
"""Most embedding rows past the tokenizer's ids, as a fraction of ``vocab_size``, still read as padding. Models
round their embedding up for fast kernels (Gemma 3: 262208 rows for 262145 tokens, 0.02 %); a gap beyond 1 %
(256000 rows for a 32000-token tokenizer) means the tokenizer belongs to another model."""

_UNUSED = re.compile(r"<unused_?\d+>|<\|reserved_special_token_\d+\|>|\[unused\d+\]")
_CONTROL = re.compile(r"<[^\s<>]+>")  # also <|...|>
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]+")  # ASCII controls that str.isspace() rejects


def vocabulary_table(tokenizer_json: Path, vocab_size: int) -> pd.DataFrame:
    """One row per token id ``0..vocab_size-1``: ``token_id`` (int64), ``token`` (``decode([id],
    skip_special_tokens=False)``; '' for padding) and ``token_class`` (one of ``TOKEN_CLASSES``, rules in the
    module docstring). Raises ``WeightFileError`` for a missing or unreadable file, a tokenizer.json without its
    metadata (``model.vocab``, ``added_tokens``) and a tokenizer whose size disagrees with ``vocab_size``
    (more ids than rows, or more padding rows than ``PADDING_TOLERANCE`` allows)."""
    path = Path(tokenizer_json)
    data, tok = _read(path)
    piece_ids = tok.get_vocab(with_added_tokens=True)  # raw piece -> id, added tokens included
    known = max(piece_ids.values(), default=-1) + 1
    if known > vocab_size:
        raise WeightFileError(
            path,
            f"the tokenizer has {known} token ids but the model only {vocab_size} "
            "vocabulary rows: a tokenizer of another model",
        )
    if vocab_size - known > PADDING_TOLERANCE * vocab_size:
        raise WeightFileError(
            path,
            f"the model has {vocab_size} vocabulary rows but the tokenizer only {known} "
            f"token ids: {vocab_size - known} padding rows exceed {PADDING_TOLERANCE:.0%} "
            "of the vocabulary (PADDING_TOLERANCE), a tokenizer of another model",
        )
    pieces: list[str | None] = [None] * vocab_size  # None: no token maps to the row
    for piece, i in piece_ids.items():
        pieces[i] = piece
    tokens = tok.decode_batch([[i] for i in range(known)], skip_special_tokens=False) + [""] * (vocab_size - known)
    added = {a["content"] for a in data["added_tokens"]}
    flagged = {a["content"] for a in data["added_tokens"] if a.get("special")} | _unk_piece(data["model"])
    classes = [_token_class(p, t, flagged, added) for p, t in zip(pieces, tokens)]
    return pd.DataFrame({"token_id": np.arange(vocab_size, dtype=np.int64), "token": tokens, "token_class": classes})


def token_strings(tokenizer_json: Path, vocab_size: int) -> list[str]:
    """Readable string of each token id < ``vocab_size``: ``decode([id])`` (so 'Ġrun' reads ' run',
    '▁run' reads ' run'); ids the tokenizer does not know (padding rows of the embedding) read ''.
    The ``token`` column of ``vocabulary_table``, with its checks."""
    return vocabulary_table(tokenizer_json, vocab_size)["token"].tolist()


def _read(path: Path) -> tuple[dict[str, Any], Tokenizer]:
    """(the tokenizer.json as JSON, the tokenizers library's Tokenizer of it), or a WeightFileError naming what
    is wrong with the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WeightFileError(path, "tokenizer file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightFileError(path, f"cannot read the tokenizer file ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WeightFileError(path, f"not a tokenizer.json: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightFileError(path, "not a tokenizer.json: the JSON is not an object")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)):
        raise WeightFileError(path, "tokenizer.json without metadata: no 'model' section with a 'vocab'")
    if not isinstance(data.get("added_tokens"), list):
        raise WeightFileError(path, "tokenizer.json without metadata: no 'added_tokens' list")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for JSON it cannot load
        raise WeightFileError(path, f"not a tokenizer: the tokenizers library cannot load it ({exc})") from exc
    return data, tok


def _token_class(piece: str | None, token: str, flagged: set[str], added: set[str]) -> str:
    """The class of one token id from its raw vocabulary ``piece`` and its decode ``token``; the rules of the
    module docstring in their order of precedence. ``flagged``: pieces the metadata marks special; ``added``:
    the added tokens' contents."""
    if piece is None:
        return "padding"
    if _UNUSED.fullmatch(piece) or _UNUSED.fullmatch(token):
        return "unused"
    byte_piece = _BYTE_PIECE.fullmatch(piece) is not None
    if piece in flagged or (piece in added and _CONTROL.fullmatch(piece) and not byte_piece):
        return "special"
    if byte_piece or "\ufffd" in token or _CONTROL_CHARS.fullmatch(token):
        return "byte"
    if (token or piece.replace("▁", " ")).isspace():  # a Strip decoder (Llama 2 style) decodes a bare '▁' to ''
        return "whitespace"
    return "normal"


def _unk_piece(model: dict[str, Any]) -> set[str]:
    """The model's unknown token: ``unk_token`` (BPE, WordPiece, WordLevel) or ``unk_id`` into a Unigram vocab."""
    if isinstance(model.get("unk_token"), str):
        return {model["unk_token"]}
    if isinstance(model.get("unk_id"), int) and isinstance(model["vocab"], list):
        return {model["vocab"][model["unk_id"]][0]}
    return set()


def normal_tokens(vocabulary: pd.DataFrame) -> np.ndarray:
    """Per token id (position = id), whether it is a ``normal`` token, from a ``vocabulary_table`` (any row order)."""
    ordered = vocabulary.sort_values("token_id")
    if not np.array_equal(ordered["token_id"].to_numpy(), np.arange(len(ordered))):
        raise ValueError("a vocabulary table must hold every token id 0..n-1 exactly once")
    return (ordered["token_class"] == "normal").to_numpy()

"""Token strings of a model's vocabulary, read from its ``tokenizer.json`` (no model, no text)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from core.errors import WeightFileError


def token_strings(tokenizer_json: Path, vocab_size: int) -> list[str]:
    """Readable string of each token id < ``vocab_size``: ``decode([id])`` (so 'Ġrun' reads ' run',
    '▁run' reads ' run'); ids the tokenizer does not know (padding rows of the embedding) read ''."""
    try:
        tok = Tokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise WeightFileError(tokenizer_json, f"unreadable tokenizer ({exc})") from exc
    known = tok.get_vocab_size(with_added_tokens=True)
    return [tok.decode([i], skip_special_tokens=False) if i < known else "" for i in range(vocab_size)]

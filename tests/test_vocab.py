"""Vocabulary hygiene (core.weights.vocab): every token id's class on Gemma-, Llama-3- and GPT-2-style tokenizers built
offline, and the errors for files that cannot be used."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import yaml
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from core.errors import WeightFileError
from core.testbeds.planted import PlantedParams, gpt2_tokenizer
from core.weights.vocab import PADDING_TOLERANCE, TOKEN_CLASSES, token_strings, vocabulary_table

pytestmark = pytest.mark.unit

GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
LLAMA_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
RELEASES = Path(__file__).resolve().parents[1] / "core" / "releases.yaml"
# The planted models' vocabulary sizes: PlantedParams' default and each planted release's own.
PLANTED_VOCAB_SIZES = sorted(
    {{f.name: f.default for f in dataclasses.fields(PlantedParams)}["vocab_size"]}
    | {
        entry["planted"]["vocab_size"]
        for entry in yaml.safe_load(RELEASES.read_text())["releases"].values()
        if "vocab_size" in entry.get("planted", {})
    }
)


def _save(tok: Tokenizer, folder: Path) -> Path:
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def _decode_each(path: Path, vocab_size: int) -> list[str]:
    """token_strings' definition before vocabulary_table: decode([id]) one id at a time, '' past the tokenizer."""
    tok = Tokenizer.from_file(str(path))
    known = tok.get_vocab_size(with_added_tokens=True)
    return [tok.decode([i], skip_special_tokens=False) if i < known else "" for i in range(vocab_size)]


def _byte_char_class(b: int) -> str:
    """The class of a single-byte token: U+FFFD past ASCII, controls as bytes, spaces, else normal."""
    c = chr(b)
    return "byte" if b >= 0x80 or not (c.isprintable() or c.isspace()) else "whitespace" if c.isspace() else "normal"


def _gemma_spec(size: int = 0) -> list[tuple[str, str]]:
    """(piece, expected class) in id order, laid out as Gemma's vocabulary: specials, <unusedN>, bytes, pieces;
    filled with words '▁w{i}' up to ``size`` pieces."""
    spec = [(p, "special") for p in GEMMA_SPECIAL] + [(f"<unused{i}>", "unused") for i in range(10)]
    spec += [(f"<0x{b:02X}>", "byte") for b in range(256)]
    spec += [("▁", "whitespace"), ("\n", "whitespace"), ("▁▁", "whitespace"), ("\t", "whitespace")]
    spec += [(p, "normal") for p in ["▁the", "▁The", "the", "The", "▁Paris", "Paris", "▁paris", "<", "▁<"]]
    spec += [("<h1>", "special")]  # an unflagged added token that looks like a control token (Gemma's markup)
    return spec + [(f"▁w{i}", "normal") for i in range(size - len(spec))]


def _gemma_tokenizer(strip: bool, size: int = 0) -> Tokenizer:
    """A Gemma-style SentencePiece BPE with byte fallback: its decoder replaces '▁' by ' ', reads <0xAB> pieces as
    bytes and fuses; ``strip`` adds a Strip of one leading space (Llama 2 style; Gemma's own decoder has none)."""
    spec = _gemma_spec(size)
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, (p, _) in enumerate(spec)},
            merges=[],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if strip else []))
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in GEMMA_SPECIAL])
    tok.add_tokens(
        [AddedToken(f"<unused{i}>", special=False, normalized=False) for i in range(10)]
        + [AddedToken("<h1>", special=False, normalized=False)]
    )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _llama3_tokenizer() -> tuple[Tokenizer, list[str]]:
    """A Llama-3-style byte-level BPE (the 256 byte tokens first, words, then special added tokens) and the
    expected class of each id."""
    byte = _bytes_to_unicode()
    words = {
        "Ġthe": "normal",
        "the": "normal",
        "ĠThe": "normal",
        "ĠParis": "normal",
        "ĠĠ": "whitespace",
        "ĊĊ": "whitespace",
        "âĢ": "byte",
        "ĠâĢ": "byte",
        "âĢĶ": "normal",
    }  # 'âĢĶ' = E2 80 94 = '—'
    vocab = {byte[b]: b for b in range(256)} | {w: 256 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    reserved = [(f"<|reserved_special_token_{i}|>", "unused") for i in range(6)]  # special added tokens in Llama 3
    added = [(t, "special") for t in LLAMA_SPECIAL[:2]] + reserved[:2] + [(LLAMA_SPECIAL[2], "special")] + reserved[2:]
    tok.add_special_tokens([AddedToken(t, special=True) for t, _ in added])
    return tok, [_byte_char_class(b) for b in range(256)] + list(words.values()) + [c for _, c in added]


@pytest.mark.parametrize("strip", [False, True], ids=["gemma-decoder", "strip-decoder"])
def test_gemma_style_sentencepiece(tmp_path: Path, strip: bool) -> None:
    spec = _gemma_spec()
    tok = _gemma_tokenizer(strip)
    assert tok.get_vocab_size(with_added_tokens=True) == len(spec)  # the added tokens reuse the model's ids
    path = _save(tok, tmp_path)
    padding = int(PADDING_TOLERANCE * (len(spec) + 2))  # a few padding rows, as Gemma 3 has
    table = vocabulary_table(path, len(spec) + padding)
    assert table.token_class.tolist() == [c for _, c in spec] + ["padding"] * padding
    assert table.token_id.dtype == "int64" and table.token_id.tolist() == list(range(len(spec) + padding))
    assert set(table.token_class) <= set(TOKEN_CLASSES)
    tokens = dict(zip([p for p, _ in spec], table.token))
    assert tokens["<bos>"] == "<bos>" and tokens["<unused3>"] == "<unused3>"
    assert tokens["<0x41>"] == "A" and tokens["<0x0A>"] == "\n" and tokens["<0xE2>"] == "\ufffd"
    assert tokens["▁the"] == ("the" if strip else " the") and tokens["▁"] == ("" if strip else " ")
    in_memory = [tok.decode([i], skip_special_tokens=False) for i in range(len(spec))] + [""] * padding
    assert table.token.tolist() == _decode_each(path, len(table)) == in_memory
    assert token_strings(path, len(table)) == table.token.tolist()


def test_llama3_style_byte_level_bpe(tmp_path: Path) -> None:
    tok, expected = _llama3_tokenizer()
    path = _save(tok, tmp_path)
    table = vocabulary_table(path, len(expected))
    assert table.token_class.tolist() == expected
    by_piece = dict(zip((tok.id_to_token(i) for i in range(len(expected))), table.itertuples()))
    assert by_piece["â"].token == "\ufffd" and by_piece["â"].token_class == "byte"  # the single byte 0xE2
    assert (by_piece["Ġ"].token, by_piece["Ġ"].token_class) == (" ", "whitespace")
    assert (by_piece["Ċ"].token, by_piece["Ċ"].token_class) == ("\n", "whitespace")
    assert (by_piece["Ā"].token, by_piece["Ā"].token_class) == ("\x00", "byte")
    assert (by_piece["A"].token_class, by_piece["ĠParis"].token) == ("normal", " Paris")
    assert by_piece["<|reserved_special_token_0|>"].token_class == "unused"  # flagged special, reserved by name
    assert by_piece["<|eot_id|>"].token_class == "special"
    assert token_strings(path, len(expected)) == table.token.tolist() == _decode_each(path, len(expected))


def test_unigram_unk_id_and_t5_sentinels(tmp_path: Path) -> None:
    """A Unigram vocabulary (a list of [piece, score]): its unk_id marks <unk> special with no added token;
    T5's <extra_id_N> sentinels are trained control tokens, so special, not unused; BERT's [unusedN] is unused."""
    tok = Tokenizer(
        models.Unigram(
            [("<unk>", 0.0), ("▁a", -1.0), ("<0x41>", -2.0), ("[unused7]", -3.0)], unk_id=0, byte_fallback=True
        )
    )
    tok.add_special_tokens([AddedToken("<extra_id_0>", special=True)])
    table = vocabulary_table(_save(tok, tmp_path), 5)
    assert table.token_class.tolist() == ["special", "normal", "byte", "unused", "special"]


@pytest.mark.parametrize("vocab_size", PLANTED_VOCAB_SIZES)
def test_gpt2(tmp_path: Path, vocab_size: int) -> None:
    """The real GPT-2 BPE the planted releases ship, at the planted models' vocabulary sizes."""
    gpt2_tokenizer(vocab_size).save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.json"
    table = vocabulary_table(path, vocab_size)
    classes = table.token_class.value_counts()
    assert table.token_class.iloc[-1] == "special" and table.token.iloc[-1] == "<|endoftext|>"
    assert classes.get("special") == 1 and "unused" not in classes and "padding" not in classes
    single = table.iloc[:256]  # GPT-2's 256 single-byte tokens come first
    assert (single.token_class[single.token == "\ufffd"] == "byte").all() and (single.token == "\ufffd").sum() == 128
    the = table[table.token == " the"]
    assert len(the) == 1 and the.token_class.item() == "normal"
    assert table.token_class[table.token == " "].tolist() == ["whitespace"]
    assert table.token.tolist() == _decode_each(path, vocab_size) == token_strings(path, vocab_size)


def _written(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _raises(path: Path, vocab_size: int, match: str) -> None:
    with pytest.raises(WeightFileError, match=match) as err:
        vocabulary_table(path, vocab_size)
    assert err.value.path == str(path) and str(path) in str(err.value)


def test_unreadable_files(tmp_path: Path) -> None:
    _raises(tmp_path / "missing" / "tokenizer.json", 10, "not found")
    _raises(tmp_path, 10, "cannot read")  # a folder
    _raises(_written(tmp_path, "{not json"), 10, "not JSON")
    _raises(_written(tmp_path, [1, 2]), 10, "not an object")
    tok = json.loads(_gemma_tokenizer(strip=False).to_str())
    _raises(_written(tmp_path, {k: v for k, v in tok.items() if k != "model"}), 10, "no 'model' section")
    _raises(_written(tmp_path, tok | {"model": {"type": "BPE"}}), 10, "with a 'vocab'")
    _raises(_written(tmp_path, {k: v for k, v in tok.items() if k != "added_tokens"}), 10, "no 'added_tokens'")
    _raises(_written(tmp_path, tok | {"model": {"type": "NoSuchModel", "vocab": {}}}), 10, "cannot load")
    with pytest.raises(WeightFileError):
        token_strings(tmp_path / "missing.json", 10)


def _words(n: int) -> Tokenizer:
    return Tokenizer(models.BPE(vocab={f"w{i}": i for i in range(n)}, merges=[]))


def test_vocabulary_size_must_match(tmp_path: Path) -> None:
    path = _save(_words(990), tmp_path)
    _raises(path, 989, "990 token ids but the model only 989")
    table = vocabulary_table(path, 1000)  # 10 padding rows = 1 % of 1000: the most allowed
    assert table.token_class.value_counts().to_dict() == {"normal": 990, "padding": 10}
    assert (table.token[table.token_class == "padding"] == "").all()
    _raises(path, 1001, "11 padding rows exceed 1%")
    _raises(_save(_words(3200), tmp_path), 25600, "25600 vocabulary rows but the tokenizer only 3200")


def test_holes_are_padding(tmp_path: Path) -> None:
    """An id below the tokenizer's highest that no piece maps to is an embedding row without a token."""
    path = _save(Tokenizer(models.BPE(vocab={"a": 0, "b": 2}, merges=[])), tmp_path)
    table = vocabulary_table(path, 3)
    assert table.token_class.tolist() == ["normal", "padding", "normal"] and table.token.tolist() == ["a", "", "b"]


def test_a_256k_vocabulary_classifies_in_seconds(tmp_path: Path) -> None:
    """Gemma's size: 262144 pieces (specials, <unusedN>, byte pieces, words) plus 64 padding rows."""
    spec = _gemma_spec(262_144)
    path = _save(_gemma_tokenizer(strip=False, size=len(spec)), tmp_path)
    start = time.perf_counter()
    table = vocabulary_table(path, 262_208)
    seconds = time.perf_counter() - start
    print(f"vocabulary_table on 262144 tokens + 64 padding rows: {seconds:.2f} s")
    assert table.token_class.tolist() == [c for _, c in spec] + ["padding"] * 64
    assert seconds < 10.0

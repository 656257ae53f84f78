"""Vocabulary traps of the planted test bed (release ``planted-gemma-hard``, ``core.testbeds.planted`` "Hard cases"):
each trap class is what the truth says it is, read back from the written hub files with the project's loaders
(``core.weights.model_weights``, ``core.weights.sae_formats``, ``core.lens.output_lens``,
``core.lens.circuits.input_lens``). What the classifier calls these features is tests/test_planted_hard.py's business
(``HARD_EXPECTED``).
- ``case_variant``: the top output-lens tokens are exactly one word's case / space variants;
- ``byte_token``: the top 10 all decode to U+FFFD;
- ``unused_cluster``: the top 10 are ``<unusedN>`` placeholders, which the written tokenizer.json holds at the
  recorded ids (added, not special) and encodes / decodes;
- ``current_token``: the output and the input lens both top on the recorded token.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from core.lens.circuits import input_lens
from core.lens.output_lens import output_lens
from core.registry import REGISTRY_PATH, get_release
from core.testbeds.planted import HARD_CLASSES, HARD_EXPECTED, PlantedTruth, generate
from core.weights.hub_cache import repo_cache_dir
from core.weights.model_weights import TOKENIZER_FILE, ModelCheckpoint
from core.weights.sae_formats import FORMATS, SaeWeights

pytestmark = pytest.mark.unit

RELEASE = "planted-gemma-hard"
TRAPS = ("case_variant", "byte_token", "unused_cluster", "current_token")
K = 10
# planted-gemma-hard's model with every trap count 0 (the hard block of the registry before the traps; recorded when
# the token groups were completed to group_forms forms), as ``_model_digest``: traps off must leave the model as it was
# without them. Re-record on a deliberate change of the default generator.
MODEL_DIGEST_WITHOUT_TRAPS = "0659023e865f2f3a1855631dd1b10a683e37483d"


@dataclass(frozen=True)
class Written:
    """What ``generate`` wrote, read back: truth, model checkpoint, tokenizer, SAE weights per SAE id."""

    truth: PlantedTruth
    checkpoint: ModelCheckpoint
    tokenizer: Tokenizer
    saes: dict[str, SaeWeights]
    seconds: float  # generation time

    def features(self, cls: str) -> list[tuple[str, list[dict]]]:
        """Per SAE id: the ``detail`` entries of trap class ``cls`` (one per feature)."""
        return [(sid, s["hard_cases"]["detail"][cls]) for sid, s in self.truth.data["saes"].items()]


def _hard_block() -> dict:
    return yaml.safe_load(REGISTRY_PATH.read_text())["releases"][RELEASE]["planted"]["hard"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Written:
    cache = tmp_path_factory.mktemp("hf-traps")
    start = time.perf_counter()
    truth = generate(RELEASE, cache)
    seconds = time.perf_counter() - start
    model = repo_cache_dir(cache, truth.model_repo) / "snapshots" / truth.model_commit
    sae_root = repo_cache_dir(cache, truth.sae_repo) / "snapshots" / truth.sae_commit
    fmt = FORMATS[get_release(RELEASE).format]
    saes = {sid: fmt.read(sae_root / s["folder"]) for sid, s in truth.data["saes"].items()}
    return Written(truth, ModelCheckpoint(model), Tokenizer.from_file(str(model / TOKENIZER_FILE)), saes, seconds)


def _top(directions: torch.Tensor, w: Written, lens=output_lens) -> list[list[int]]:
    """The K best tokens of each direction, hub tokens left out (rows of 3x norm: a hard case of their own that
    can enter any top list)."""
    hubs = set(w.truth.data["hard"]["hub_tokens"]["token_ids"])
    top = lens(directions, w.checkpoint, k=K + len(hubs)).top_ids.tolist()
    return [[i for i in row if i not in hubs][:K] for row in top]


def _taken(data: dict) -> set[int]:
    """Token ids of the planted groups, string-free groups and hubs."""
    hard = data["hard"]
    return {i for g in data["token_groups"] + hard["string_free_groups"] for i in g["token_ids"]} | set(
        hard["hub_tokens"]["token_ids"]
    )


def test_generation_stays_fast(written):
    print(f"\n{RELEASE} generated in {written.seconds:.1f} s")
    assert written.seconds < 30


def test_trap_classes_are_drawn_as_configured(written):
    data, block = written.truth.data, _hard_block()
    assert (
        {c: data["hard"]["expected"][c] for c in TRAPS}
        == {
            "case_variant": {"semantic_output": False, "output_predicting": False},
            "byte_token": {"semantic_output": False, "output_predicting": False},
            "unused_cluster": {"semantic_output": False, "output_predicting": False},
            "current_token": {"token_identity": True},
        }
        == {c: HARD_EXPECTED[c] for c in TRAPS}
    )
    for sae in data["saes"].values():
        cases, semantic = sae["hard_cases"], {f["index"] for f in sae["semantic_features"]}
        drawn = [f for c in HARD_CLASSES for f in cases[c]]
        assert len(drawn) == len(set(drawn)) and semantic.isdisjoint(drawn)  # disjoint, from the non-semantic ones
        for c in TRAPS:
            assert len(cases[c]) == block[c] > 0
            assert [d["feature"] for d in cases["detail"][c]] == cases[c]


def test_tokenizer_holds_the_unused_placeholders(written):
    tok, vocab_size = written.tokenizer, written.checkpoint.geometry.vocab_size
    ids = written.truth.data["hard"]["unused_tokens"]["token_ids"]
    n = _hard_block()["unused_tokens"]
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    assert ids == list(range(vocab_size - 1 - n, vocab_size - 1))  # just before <|endoftext|>
    assert tok.id_to_token(vocab_size - 1) == "<|endoftext|>"
    added = tok.get_added_tokens_decoder()
    for k, i in enumerate(ids):
        assert tok.id_to_token(i) == tok.decode([i]) == f"<unused{k}>"
        assert not added[i].special
    text = "The cart<unused3> ran"
    enc = tok.encode(text)
    assert ids[3] in enc.ids and tok.decode(enc.ids) == text


def test_case_variant_tops_are_one_words_variants(written):
    taken = _taken(written.truth.data)
    for sid, detail in written.features("case_variant"):
        feats = [d["feature"] for d in detail]
        for d, top in zip(detail, _top(written.saes[sid].decoder_directions()[feats], written), strict=True):
            forms = {t.replace("Ġ", "").casefold() for t in d["tokens"]}
            assert forms == {d["word"]} and len(d["token_ids"]) >= 3 and taken.isdisjoint(d["token_ids"])
            assert set(top[: len(d["token_ids"])]) == set(d["token_ids"]), (sid, d)


def test_byte_token_tops_decode_to_replacement_char(written):
    tok = written.tokenizer
    assert all(tok.decode([i]) == "\ufffd" for i in written.truth.data["hard"]["byte_tokens"]["token_ids"])
    for sid, detail in written.features("byte_token"):
        feats = [d["feature"] for d in detail]
        for top in _top(written.saes[sid].decoder_directions()[feats], written):
            assert [tok.decode([i]) for i in top] == ["\ufffd"] * K, sid


def test_unused_cluster_tops_are_placeholders(written):
    unused = set(written.truth.data["hard"]["unused_tokens"]["token_ids"])
    for sid, detail in written.features("unused_cluster"):
        feats = [d["feature"] for d in detail]
        for top in _top(written.saes[sid].decoder_directions()[feats], written):
            assert unused.issuperset(top), sid


def test_current_token_tops_both_lenses_on_its_token(written):
    taken = _taken(written.truth.data)
    for sid, detail in written.features("current_token"):
        feats, tokens = [d["feature"] for d in detail], [d["token_id"] for d in detail]
        sae = written.saes[sid]
        out_top = [t[0] for t in _top(sae.decoder_directions()[feats], written)]
        in_top = [t[0] for t in _top(sae.encoder_directions()[feats], written, lens=input_lens)]
        assert out_top == in_top == tokens and taken.isdisjoint(tokens), sid


def _model_digest(snapshot: Path) -> str:
    """sha1 over what defines the model's function: the weight shards, the tokenizer and config.json without the
    ``transformers_version`` stamp (the snapshot's commit hashes that stamp too, so it moves with every transformers
    release: 5.24 -> 5.25 changed nothing else)."""
    digest = hashlib.sha1()
    for path in sorted(snapshot.iterdir()):
        if path.name == "config.json":
            config = {k: v for k, v in json.loads(path.read_text()).items() if k != "transformers_version"}
            data = json.dumps(config, sort_keys=True).encode()
        elif path.suffix == ".safetensors" or path.name == TOKENIZER_FILE:
            data = path.read_bytes()
        else:
            continue
        digest.update(path.name.encode() + data)
    return digest.hexdigest()


def test_traps_off_leave_the_model_as_before(tmp_path: Path):
    off = {**_hard_block(), **{c: 0 for c in (*TRAPS, "unused_tokens")}}
    truth = generate(RELEASE, tmp_path, overrides={"hard": off})
    assert _model_digest(repo_cache_dir(tmp_path, truth.model_repo) / "snapshots" / truth.model_commit) == (
        MODEL_DIGEST_WITHOUT_TRAPS
    )
    assert all(not sae["hard_cases"][c] for sae in truth.data["saes"].values() for c in TRAPS)

"""The embedded demo's corpus and tiny model."""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from loupe.demo import BOS_ID, EOS_ID, PAD_ID, TinyModelSpec, write_corpus
from loupe.errors import LoupeError

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_corpus_is_deterministic_english_prose(tmp_path):
    a = write_corpus(tmp_path / "a.jsonl.gz", 10_000, stdlib=STDLIB / "json")
    write_corpus(tmp_path / "b.jsonl.gz", 10_000, stdlib=STDLIB / "json")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    assert len(docs) == a["documents"] > 80
    text = " ".join(d["text"] for d in docs)
    assert text.count(" the ") > 200  # prose, not code
    assert {d["source"].split(":")[0] for d in docs} >= {"pydoc_data.topics", "decoder.py"}


def test_corpus_too_small_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(
        LoupeError, match=r"harvested only [\d,]+ bytes of prose, need 1,000,000,000"
    ):
        write_corpus(tmp_path / "c.jsonl.gz", 1_000_000_000, stdlib=STDLIB / "json")
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_has_the_real_architecture(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(model).__name__ == "Gemma4ForConditionalGeneration"
    text = model.config.get_text_config()
    spec = TinyModelSpec()
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    # Shared-KV layers reuse earlier layers' keys and values; the unshared prefix has both kinds.
    assert 0 < text.num_kv_shared_layers < text.num_hidden_layers == spec.num_hidden_layers
    assert set(text.layer_types[: text.num_hidden_layers - text.num_kv_shared_layers]) == set(
        text.layer_types
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert (
        (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
        == (PAD_ID, EOS_ID, BOS_ID)
        == (0, 1, 2)
    )
    ids = tok("The parser returns a list of tokens.", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "The parser returns a list of tokens."
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[BOS_ID, *ids]])).logits
    assert logits.shape == (1, len(ids) + 1, spec.vocab_size) and torch.isfinite(logits).all()

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedrdma.fl.data import (
    BYTE_TOKENIZER_VOCAB_SIZE,
    EOS_ID,
    ByteTokenizer,
    HFTokenizer,
    check_vocab,
    load_silo_data,
    load_tokenizer,
    pack_blocks,
    read_documents,
    split_documents,
)
from fedrdma.fl.inputs import CORPUS_DIR, DEMO_EVAL, DEMO_SILOS, DataError, demo_corpus
from fedrdma.fl.model import GPT2_SIZES

REPO = Path(__file__).resolve().parent.parent
CORPUS_BUDGET_BYTES = 3 << 20
"""The shipped corpus must stay a few MB at most."""


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer()
    text = "Plan: admit. Température 38,5 °C — ok ✓"
    ids = tok.encode(text)
    assert ids[:5] == [80, 108, 97, 110, 58]
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    assert tok.vocab_size == BYTE_TOKENIZER_VOCAB_SIZE == GPT2_SIZES["gpt2-tiny"]["vocab_size"]


def test_load_tokenizer_picks_byte_for_named_sizes():
    assert isinstance(load_tokenizer("gpt2-tiny"), ByteTokenizer)
    assert isinstance(load_tokenizer("gpt2-small"), ByteTokenizer)
    check_vocab(load_tokenizer("gpt2-small"), GPT2_SIZES["gpt2-small"]["vocab_size"])
    with pytest.raises(DataError, match="larger vocab_size"):
        check_vocab(ByteTokenizer(), 200)


def test_load_tokenizer_uses_a_checkpoints_own(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1, "patient": 2, "stable": 3, "is": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<eos>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("patient is stable") == [2, 4, 3]
    assert tok.eos_id == 1 and tok.vocab_size == 5
    assert tok.decode([2, 4, 3, 1]) == "patient is stable"


def test_load_tokenizer_errors_on_checkpoint_without_one(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DataError, match="save_pretrained"):
        load_tokenizer(tmp_path)


def test_read_txt_splits_documents_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first doc\nline two\n\n\n  second doc  \r\n\r\nthird\n")
    assert read_documents(path) == ["first doc\nline two", "second doc", "third"]


def test_read_jsonl_and_its_errors(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"text": "a b"}\n\n{"text": "c", "domain": "x"}\n')
    assert read_documents(good) == ["a b", "c"]
    missing_field = tmp_path / "bad.jsonl"
    missing_field.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:2: no "text" field'):
        read_documents(missing_field)
    not_json = tmp_path / "broken.jsonl"
    not_json.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2: not valid JSON"):
        read_documents(not_json)
    wrong_type = tmp_path / "num.jsonl"
    wrong_type.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="expected a string"):
        read_documents(wrong_type)


def test_read_errors_on_missing_empty_or_unknown_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"use one of \.txt, \.jsonl"):
        read_documents(tmp_path / "data.csv")


def test_split_is_seeded_disjoint_and_complete():
    docs = [f"doc {i}" for i in range(50)]
    train, held = split_documents(docs, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40
    assert set(train) | set(held) == set(docs) and not set(train) & set(held)
    assert split_documents(docs, 0.2, seed=3) == (train, held)
    assert split_documents(docs, 0.2, seed=4)[1] != held
    with pytest.raises(DataError, match="between 0 and 1"):
        split_documents(docs, 1.0)


def test_pack_blocks_separates_documents_with_eos():
    tok = ByteTokenizer()
    blocks = pack_blocks(["abc", "de"], tok, seq_len=3)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[97, 98, 99], [EOS_ID, 100, 101]]  # trailing EOS dropped (partial block)
    with pytest.raises(DataError, match="fewer than one block"):
        pack_blocks(["ab"], tok, seq_len=8)


def test_demo_corpus_is_small_non_iid_and_loads():
    total = sum(p.stat().st_size for p in CORPUS_DIR.iterdir())
    assert total <= CORPUS_BUDGET_BYTES
    shares = {}
    for silo in DEMO_SILOS:
        lines = [json.loads(line) for line in demo_corpus(silo).read_text().splitlines()]
        shares[silo] = sum(r["domain"] == silo for r in lines) / len(lines)
    assert all(share > 0.75 for share in shares.values())  # each silo mostly its own domain
    tok = ByteTokenizer()
    sizes = [load_silo_data(demo_corpus(s), tok, 128).train.shape[0] for s in DEMO_SILOS]
    assert len(set(sizes)) == len(sizes)  # unequal sample counts, so FedAvg weights differ
    eval_docs = read_documents(demo_corpus(DEMO_EVAL))
    for silo in DEMO_SILOS:
        assert not set(eval_docs) & set(read_documents(demo_corpus(silo)))  # held-out text is fresh
    with pytest.raises(DataError, match="choose one of"):
        demo_corpus("casino")


def test_corpus_regenerates_byte_identically(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_corpus.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for path in sorted(CORPUS_DIR.glob("*.jsonl")):
        fresh = tmp_path / path.name
        assert hashlib.sha256(fresh.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest(), path.name

"""A silo's local text: tokenizer, reading, packing into blocks, held-out split.

Nothing is downloaded. Without a checkpoint the tokenizer is byte-level (every UTF-8 text
encodes, the vocabulary is fixed at 259 and matches `gpt2-tiny`); with a local checkpoint
directory its own tokenizer is used, because its embeddings were trained for those ids.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoTokenizer

from fedrdma.fl.inputs import DataError, check_text

BYTE_VOCAB = 256
"""One id per byte value: any text encodes, nothing is out of vocabulary."""
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
BYTE_TOKENIZER_VOCAB_SIZE = 259
"""256 bytes + BOS/EOS/PAD; equals `gpt2-tiny`'s vocab_size in fl/model.py."""

EVAL_FRACTION = 0.1
"""Share of a silo's documents held out for its local eval: enough blocks for a stable
loss on the demo corpus, little enough to leave most text for training."""

SPLIT_SEED = 0
"""Seed of the document-level train/eval split; fixed so every run holds out the same text."""

class Tokenizer(Protocol):
    """What training needs from a tokenizer; both the byte tokenizer and HF ones fit."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus BOS/EOS/PAD; needs no files."""

    vocab_size = BYTE_TOKENIZER_VOCAB_SIZE
    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Special ids are dropped; a sequence cut inside a multi-byte character decodes with U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")


class HFTokenizer:
    """A checkpoint's own tokenizer behind the same small interface."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError(
                "the checkpoint's tokenizer has no EOS token, needed to separate documents; "
                "set `eos_token` in its tokenizer_config.json"
            )
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(model: str | Path) -> Tokenizer:
    """The tokenizer that goes with `model`: a checkpoint directory's own, else the byte one.

    `model` is what `build_model` takes: a GPT-2 size name (byte tokenizer) or a local
    checkpoint directory (its tokenizer files, loaded without network access).
    """
    path = Path(model)
    if path.is_dir():
        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"checkpoint {path} has no usable tokenizer ({exc}); save one beside the weights "
                "with tokenizer.save_pretrained(dir)"
            ) from exc
    return ByteTokenizer()


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids the model's embedding cannot hold."""
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary holds {vocab_size}; "
            "use the checkpoint's own tokenizer or a model with a larger vocab_size"
        )


def read_documents(path: str | Path) -> list[str]:
    """A silo's documents: blank-line-separated paragraphs of a .txt, or `text` of each .jsonl line.

    Documents are the unit of the held-out split, so no text is shared between train and eval.
    """
    path = check_text(path)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        docs = [part.strip() for part in raw.replace("\r\n", "\n").split("\n\n")]
        docs = [d for d in docs if d]
    else:
        docs = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from exc
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f'{path}:{lineno}: no "text" field; each line must look like {{"text": "..."}}')
            if not isinstance(record["text"], str):
                raise DataError(f'{path}:{lineno}: "text" is {type(record["text"]).__name__}, expected a string')
            if record["text"]:
                docs.append(record["text"])
    if not docs:
        raise DataError(f"text file {path} holds no text; add documents to it")
    return docs


def split_documents(
    docs: Sequence[str], eval_fraction: float = EVAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[list[str], list[str]]:
    """Hold out `eval_fraction` of the documents (at least one), chosen by a seeded shuffle."""
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction is {eval_fraction}; it must be between 0 and 1 (exclusive)")
    if len(docs) < 2:
        raise DataError(f"{len(docs)} document(s) cannot be split into train and eval; provide at least 2")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(docs) * eval_fraction))
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def pack_blocks(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut into `[n_blocks, seq_len]` int64 ids.

    The tail shorter than a block is dropped: causal LM blocks need no padding that way, and
    labels are the inputs themselves (the model shifts them).
    """
    if seq_len < 2:
        raise DataError(f"seq_len is {seq_len}; a causal LM block needs at least 2 tokens")
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.append(tokenizer.eos_id)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the text gives {len(ids)} tokens, fewer than one block of seq_len={seq_len}; add text or lower seq_len"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.int64).view(n_blocks, seq_len)


@dataclass(frozen=True)
class SiloData:
    """A silo's training blocks and its local held-out blocks."""

    train: torch.Tensor
    eval: torch.Tensor
    n_documents: int


def load_silo_data(
    path: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    eval_fraction: float = EVAL_FRACTION,
    seed: int = SPLIT_SEED,
) -> SiloData:
    """Read, split by document, and pack a silo's text."""
    docs = read_documents(path)
    train_docs, eval_docs = split_documents(docs, eval_fraction, seed)
    return SiloData(pack_blocks(train_docs, tokenizer, seq_len), pack_blocks(eval_docs, tokenizer, seq_len), len(docs))


def load_eval_blocks(path: str | Path, tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """All of a held-out file as blocks (the aggregator's shared eval set)."""
    return pack_blocks(read_documents(path), tokenizer, seq_len)


"""The model and the data, shared by the ServerApp and the ClientApp."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedrdma.fl.data import load_eval_blocks, load_silo_data, load_tokenizer
from fedrdma.fl.inputs import DEMO_EVAL, DEMO_SILOS, demo_corpus
from fedrdma.fl.model import apply_lora, build_model
from fedrdma.fl.trainer import LocalTrainer, evaluate

Config = dict[str, bool | int | float | str]


def model(rc: Config) -> torch.nn.Module:
    """The same model on every site: built from its config (or a local checkpoint) with the run's seed."""
    built = build_model(str(rc["model"]), seed=int(rc["seed"]))
    return apply_lora(built) if rc["lora"] else built


def trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def arrays(module: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({name: Array(p.detach().numpy()) for name, p in trainable(module).items()})


def load(module: torch.nn.Module, record: ArrayRecord) -> None:
    params = trainable(module)
    with torch.no_grad():
        for name, array in record.items():
            params[name].copy_(torch.from_numpy(np.asarray(array.numpy())))


def train(module: torch.nn.Module, rc: Config, partition: int, server_round: int) -> tuple[int, float, float]:
    """This site's local steps on its part of the shipped corpus: (examples, loss, seconds)."""
    site = DEMO_SILOS[partition % len(DEMO_SILOS)]
    data = load_silo_data(demo_corpus(site), load_tokenizer(str(rc["model"])), int(rc["seq-len"]))
    trainer = LocalTrainer(module, data.train, float(rc["lr"]), int(rc["local-steps"]), int(rc["batch-size"]),
                           seed=int(rc["seed"]) + partition)
    return trainer.train_round(server_round)


def held_out(module: torch.nn.Module, rc: Config) -> tuple[float, int]:
    """Loss on the first `eval-blocks` blocks of the shipped held-out text (all of it is 2000 blocks of 64
    tokens: minutes of GPT-2 small on a 2-core host, for every site and round)."""
    blocks = load_eval_blocks(demo_corpus(DEMO_EVAL), load_tokenizer(str(rc["model"])), int(rc["seq-len"]))
    blocks = blocks[: int(rc["eval-blocks"])]
    loss, _ = evaluate(module, blocks)
    return loss, int(blocks.shape[0])


def arrays_of(content: RecordDict) -> ArrayRecord:
    return next(iter(content.array_records.values()))

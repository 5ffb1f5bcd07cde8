import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedrdma.core.layout import FlatState
from fedrdma.fl.data import ByteTokenizer, load_eval_blocks, load_silo_data
from fedrdma.fl.inputs import demo_corpus
from fedrdma.fl.model import apply_lora, build_model
from fedrdma.fl.trainer import LocalTrainer, TrainingError, evaluate

SEQ_LEN = 128
EVAL_BLOCKS = 48
"""A slice of the shared eval set: enough for a stable loss, small enough to keep tests fast."""


@pytest.fixture(scope="module")
def hospital():
    return load_silo_data(demo_corpus("hospital"), ByteTokenizer(), SEQ_LEN)


@pytest.fixture(scope="module")
def eval_blocks():
    return load_eval_blocks(demo_corpus("eval"), ByteTokenizer(), SEQ_LEN)[:EVAL_BLOCKS]


def digest(state: FlatState) -> str:
    return hashlib.sha256(state.memoryview()).hexdigest()


def run_rounds(blocks: torch.Tensor, rounds: int, seed: int = 1, lora: bool = False) -> tuple[FlatState, list]:
    model = build_model("gpt2-tiny", seed=0)
    if lora:
        model = apply_lora(model, r=4, alpha=8, dropout=0.1)
    state = FlatState.adopt(model)
    trainer = LocalTrainer(model, blocks, lr=3e-3, local_steps=4, batch_size=4, seed=seed)
    return state, [trainer.train_round(r) for r in range(rounds)]


def test_local_steps_reduce_heldout_loss(hospital, eval_blocks):
    model = build_model("gpt2-tiny", seed=0)
    state = FlatState.adopt(model)
    trainer = LocalTrainer(model, hospital.train, lr=3e-3, local_steps=15, batch_size=8, seed=0)
    before, ppl_before = trainer.evaluate(eval_blocks)
    snapshot = state.buffer.clone()
    n_samples, train_loss, seconds = trainer.train_round(0)
    after, ppl_after = trainer.evaluate(eval_blocks)
    assert n_samples == hospital.train.shape[0]
    assert before > 5.0  # ~ln(259) for an untrained byte model
    assert after < before - 1.0, (before, after)
    assert ppl_after == pytest.approx(math.exp(after), rel=1e-12)
    assert ppl_before > ppl_after
    assert train_loss < before and seconds > 0
    assert not torch.equal(state.buffer, snapshot)  # training wrote into the FlatState buffer


def test_same_seed_gives_bit_identical_buffers_in_process(hospital):
    a, stats_a = run_rounds(hospital.train, rounds=2)
    b, stats_b = run_rounds(hospital.train, rounds=2)
    assert torch.equal(a.buffer, b.buffer)
    assert [s[1] for s in stats_a] == [s[1] for s in stats_b]
    c, _ = run_rounds(hospital.train, rounds=2, seed=2)
    assert not torch.equal(a.buffer, c.buffer)


def test_a_round_does_not_depend_on_the_rng_state_before_it(hospital):
    """A rejoining silo trains round r exactly like one that ran every round before it."""
    states = []
    for noise in (0, 1000):
        model = build_model("gpt2-tiny", seed=0)
        state = FlatState.adopt(model)
        torch.rand(noise)  # whatever ran before (other rounds, evaluation) must not matter
        LocalTrainer(model, hospital.train, lr=3e-3, local_steps=3, batch_size=4, seed=1).train_round(5)
        states.append(state)
    assert torch.equal(states[0].buffer, states[1].buffer)


def test_same_seed_gives_bit_identical_buffers_across_processes(hospital):
    """Another process, started with a different default thread count (1 here, nproc in this one), must land on the same bytes."""
    script = textwrap.dedent(
        """
        import hashlib, json, sys
        sys.path.insert(0, sys.argv[1])
        from test_trainer import run_rounds, digest, SEQ_LEN
        from fedrdma.fl.data import ByteTokenizer, load_silo_data
        from fedrdma.fl.inputs import demo_corpus
        blocks = load_silo_data(demo_corpus("hospital"), ByteTokenizer(), SEQ_LEN).train
        full, _ = run_rounds(blocks, rounds=2)
        lora, _ = run_rounds(blocks, rounds=2, lora=True)
        print(json.dumps([digest(full), digest(lora)]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # this process has nproc threads
    out = subprocess.run(
        [sys.executable, "-c", script, os.path.dirname(__file__)], env=env, capture_output=True, text=True, check=True
    )
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    full, _ = run_rounds(hospital.train, rounds=2)
    lora, _ = run_rounds(hospital.train, rounds=2, lora=True)
    assert remote == [digest(full), digest(lora)]


def test_lora_trains_only_adapters(hospital, eval_blocks):
    model = apply_lora(build_model("gpt2-tiny", seed=0), r=4, alpha=8)
    state = FlatState.adopt(model)
    names = [s.name for s in state.layout.specs]
    assert names and all("lora_" in n for n in names)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert any("wte" in n for n in base) and any("c_attn.base_layer" in n for n in base)
    full_bytes = FlatState.adopt(build_model("gpt2-tiny", seed=0)).nbytes
    assert state.nbytes < full_bytes // 5  # only the adapters travel
    adapters = state.buffer.clone()
    trainer = LocalTrainer(model, hospital.train, lr=1e-2, local_steps=10, batch_size=8, seed=0)
    before, _ = trainer.evaluate(eval_blocks)
    trainer.train_round(0)
    after, _ = trainer.evaluate(eval_blocks)
    assert not torch.equal(state.buffer, adapters)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), n
    assert after < before


def test_lora_init_is_reproducible():
    a = FlatState.adopt(apply_lora(build_model("gpt2-tiny", seed=0), r=4, alpha=8))
    b = FlatState.adopt(apply_lora(build_model("gpt2-tiny", seed=0), r=4, alpha=8))
    assert a.layout_id == b.layout_id and torch.equal(a.buffer, b.buffer)
    assert a.buffer.count_nonzero() > 0  # lora_A is random, so the check above means something


def test_trainer_refuses_bad_inputs(hospital):
    model = build_model("gpt2-tiny", seed=0)
    with pytest.raises(TrainingError, match="outside the model's vocabulary"):
        LocalTrainer(model, torch.full((2, 8), 300, dtype=torch.int64), lr=1e-3, local_steps=1, batch_size=1)
    with pytest.raises(TrainingError, match="exceeds the model's 128 positions"):
        LocalTrainer(model, torch.zeros((2, 129), dtype=torch.int64), lr=1e-3, local_steps=1, batch_size=1)
    with pytest.raises(TrainingError, match="int64"):
        LocalTrainer(model, torch.zeros((2, 8), dtype=torch.int32), lr=1e-3, local_steps=1, batch_size=1)
    with pytest.raises(TrainingError, match="at least 1"):
        LocalTrainer(model, hospital.train, lr=1e-3, local_steps=0, batch_size=1)


def test_evaluate_leaves_mode_and_weights_alone(eval_blocks):
    model = build_model("gpt2-tiny", seed=0)
    state = FlatState.adopt(model)
    snapshot = state.buffer.clone()
    model.train()
    loss, ppl = evaluate(model, eval_blocks[:8])
    assert model.training and torch.equal(state.buffer, snapshot)
    assert loss == evaluate(model, eval_blocks[:8])[0]  # no dropout in eval

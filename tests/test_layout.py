import pytest
import torch

from fedrdma.core.errors import LayoutError
from fedrdma.core.layout import ALIGNMENT, FlatState, Layout


def small_module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_adopt_makes_parameters_views_of_one_buffer():
    module = small_module()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    state = FlatState.adopt(module)
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), before[name])
        spec = next(s for s in state.layout.specs if s.name == name)
        assert p.data_ptr() == state.address() + spec.offset
        assert spec.offset % ALIGNMENT == 0


def test_training_updates_the_buffer_in_place():
    module = small_module()
    state = FlatState.adopt(module)
    snapshot = state.buffer.clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.ones(4, 5)).sum().backward()
    opt.step()
    assert not torch.equal(state.buffer, snapshot)
    assert torch.equal(state.views["0.weight"], module[0].weight.detach())


def test_bytes_written_to_the_buffer_change_the_model():
    module = small_module()
    state = FlatState.adopt(module)
    state.views["2.bias"].fill_(7.0)
    assert torch.all(module[2].bias == 7.0)


def test_frozen_parameters_stay_out():
    module = small_module()
    module[0].weight.requires_grad_(False)
    state = FlatState.adopt(module)
    assert "0.weight" not in state.views
    assert set(state.views) == {"0.bias", "2.weight", "2.bias"}


def test_layout_id_is_stable_and_tells_layouts_apart():
    a = Layout.from_shapes([("w", torch.float32, (4, 4)), ("b", torch.float32, (4,))])
    b = Layout.from_shapes([("w", torch.float32, (4, 4)), ("b", torch.float32, (4,))])
    c = Layout.from_shapes([("w", torch.float32, (4, 4)), ("b", torch.float16, (4,))])
    d = Layout.from_shapes([("w", torch.float32, (16,)), ("b", torch.float32, (4,))])
    assert a.layout_id == b.layout_id
    assert len({a.layout_id, c.layout_id, d.layout_id}) == 3


def test_layout_errors_name_the_problem():
    with pytest.raises(LayoutError, match="appears twice"):
        Layout.from_shapes([("w", torch.float32, (2,)), ("w", torch.float32, (2,))])
    with pytest.raises(LayoutError, match="at least one tensor"):
        Layout.from_shapes([])
    with pytest.raises(LayoutError, match="cannot travel"):
        Layout.from_shapes([("c", torch.complex64, (2,))])
    layout = Layout.from_shapes([("w", torch.float32, (2,))])
    with pytest.raises(LayoutError, match="layout needs"):
        FlatState(layout, torch.zeros(3, dtype=torch.uint8))


def test_from_tensors_copies_values():
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    state = FlatState.from_tensors(tensors)
    assert torch.equal(state.views["a"], tensors["a"])
    assert torch.equal(state.views["b"], tensors["b"])
    assert bytes(state.memoryview(state.layout.specs[1].offset, 16)) == tensors["b"].numpy().tobytes()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_benchmark_layout_from_meta_matches_the_state_the_runtime_moves(lora: bool, tmp_path) -> None:
    """Benchmarks size their pools from shapes alone; a different layout would be refused mid-run."""
    from fedrdma.bench.states import gpt2_layout
    from fedrdma.config import ModelSettings
    from fedrdma.fl.state import build_trainable

    model, state = build_trainable(ModelSettings(model="gpt2-tiny", lora=lora))
    assert gpt2_layout("gpt2-tiny", lora).layout_id == state.layout.layout_id
    if not lora:
        model.save_pretrained(tmp_path)  # a local checkpoint cannot be built on meta: loaded for real
        assert gpt2_layout(str(tmp_path)).layout_id == state.layout.layout_id

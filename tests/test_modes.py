"""What each `Mode` needs and does, written out per mode: every branch on a mode asks these."""

from __future__ import annotations

import pytest

from fedrdma.core.modes import Mode, Role

# mode: one_sided, registers_pool, in_place, receiver_places, registers_slots, seals, initiator, broadcast
EXPECTED = {
    Mode.GRPC: (False, False, False, False, False, False, Role.SENDER, Mode.GRPC),
    Mode.RDMA: (True, False, False, False, False, False, Role.SENDER, Mode.RDMA),
    Mode.RDMA_E: (True, True, True, True, False, False, Role.SENDER, Mode.RDMA_E),
    Mode.RDMA_E_PULL: (True, True, True, True, True, False, Role.RECEIVER, Mode.RDMA_E),
    Mode.TCP_E: (False, False, True, True, False, True, Role.SENDER, Mode.TCP_E),
}


@pytest.mark.parametrize("mode", list(Mode))
def test_each_mode_says_what_it_needs(mode: Mode) -> None:
    got = (mode.one_sided, mode.registers_pool, mode.in_place, mode.receiver_places, mode.registers_slots,
           mode.seals, mode.initiator, mode.broadcast)
    assert got == EXPECTED[mode]


def test_only_a_mode_whose_reads_land_in_the_shared_slots_exposes_them_to_a_nixl_peer() -> None:
    """A push's peer WRITEs into landing slots of its own; registering the shared ones too would
    hand every pushing silo's NIXL connection a reach into the others' chunks."""
    assert [m for m in Mode if m.registers_slots] == [Mode.RDMA_E_PULL]


def test_a_list_of_modes_parses_and_an_unknown_one_is_named_with_the_choices() -> None:
    assert Mode.parse_list(" grpc, rdma-e-pull ") == [Mode.GRPC, Mode.RDMA_E_PULL]
    with pytest.raises(ValueError, match=r"unknown mode\(s\) rdma-x; choose from grpc, rdma, rdma-e, rdma-e-pull, tcp-e"):
        Mode.parse_list("grpc,rdma-x")
    with pytest.raises(ValueError, match=r"\(none\)"):
        Mode.parse_list(" , ")

from fedrdma.memory import pin_mmap_threshold


def test_the_mmap_threshold_can_be_pinned_on_this_glibc():
    assert pin_mmap_threshold() is True

import subprocess
import sys
import textwrap

from fedrdma.memory import pin_mmap_threshold

# Run in a child: the threshold is process-wide and would slow every later test's training.
PROBE = textwrap.dedent(
    """
    from fedrdma import memory

    MIB = 1 << 20
    with memory.compute_heap():  # not pinned yet: nothing changes
        pass
    print(memory.pin_mmap_threshold(), memory.mmapped(4 * MIB))
    with memory.compute_heap():
        inside = memory.mmapped(4 * MIB)
    print(inside, memory.mmapped(4 * MIB), memory.mmapped(64 * MIB))
    """
)


def test_the_mmap_threshold_can_be_pinned_on_this_glibc():
    assert pin_mmap_threshold() is True


def test_compute_lifts_the_pin_and_puts_it_back():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
    # pinned: a 4 MiB chunk temporary is mmapped, so it goes back to the system on free
    assert out[0] == "True True"
    # computing: served from the heap; afterwards pinned again; above 32 MiB always mmapped
    assert out[1] == "False True True"

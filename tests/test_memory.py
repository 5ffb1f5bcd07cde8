import subprocess
import sys
import textwrap

from fedrdma.memory import pin_mmap_threshold

# Run in a child: the threshold is process-wide and would slow every later test's training.
PROBE = textwrap.dedent(
    """
    import ctypes
    from fedrdma import memory

    libc = ctypes.CDLL("libc.so.6")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def mmapped(nbytes):
        before = libc.mallinfo2().hblks
        p = libc.malloc(nbytes)
        grew = libc.mallinfo2().hblks - before
        libc.free(p)
        return grew

    MIB = 1 << 20
    with memory.compute_heap():  # not pinned yet: nothing changes
        pass
    print(memory.pin_mmap_threshold(), mmapped(4 * MIB))
    with memory.compute_heap():
        inside = mmapped(4 * MIB)
    print(inside, mmapped(4 * MIB), mmapped(64 * MIB))
    """
)


def test_the_mmap_threshold_can_be_pinned_on_this_glibc():
    assert pin_mmap_threshold() is True


def test_compute_lifts_the_pin_and_puts_it_back():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split("\n")
    # pinned: a 4 MiB chunk temporary is mmapped, so it goes back to the system on free
    assert out[0] == "True 1"
    # computing: served from the heap; afterwards pinned again; above 32 MiB always mmapped
    assert out[1] == "0 1 1"

"""features.heap: with the threshold held, a large block freed does not pull later large blocks onto the
heap (glibc's dynamic threshold does, which fragments the heap over a training loop)."""
import subprocess
import sys
import textwrap

import pytest

from features.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None or not hasattr(_glibc(), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallopt, mallinfo2): other C libraries have no "
                                       "dynamic mmap threshold to hold")

# In a fresh process: free an 8 MiB block (glibc then raises its threshold to 8 MiB unless it is held),
# allocate a 4 MiB one and print whether it came by mmap (mallinfo2's hblkhd: bytes in mmapped blocks).
PROBE = textwrap.dedent("""
    import ctypes, sys
    from features.heap import _glibc, fix_mmap_threshold
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                  "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = _glibc()
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
    libc.free(libc.malloc(8 << 20))
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(4 << 20)
    print(libc.mallinfo2().hblkhd - before >= 4 << 20)
    libc.free(block)
""")


def _mmapped_after_free(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_held_threshold_keeps_large_blocks_mmapped():
    assert _mmapped_after_free("fixed")


def test_default_glibc_moves_them_to_the_heap():
    """The behaviour the module works around, so the test above is not vacuous."""
    assert not _mmapped_after_free("default")

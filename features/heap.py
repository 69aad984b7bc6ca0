"""Keep glibc's heap from growing over a long loop of variably-sized tensors.

glibc serves a large block (>= its mmap threshold, 128 KiB at start) by mmap and unmaps it when freed,
but each time such a block is freed it raises the threshold to that block's size (up to 32 MiB). After
the first steps of a training loop, the step's large tensors therefore come from the heap, and when
their sizes vary from step to step (pretraining's masked-frame targets (M, D) with M drawn per batch,
batches trimmed to their longest sequence) the freed blocks fragment it: the resident size grows with
every step. Measured on pretraining `single` (bench/README "Pretraining and kNN against N"): +6.7 KB per
video and epoch before, flat after. A fixed threshold keeps the large blocks mmapped, returned to the
system when freed. Other C libraries (macOS, musl) have no such knob and are left alone.
"""
import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3                   # mallopt's parameter number (glibc's malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024       # glibc's initial threshold, held fixed


@functools.lru_cache(maxsize=None)
def _glibc():
    """The process's C library when it is glibc (it has gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def fix_mmap_threshold(nbytes=MMAP_THRESHOLD_BYTES):
    """Hold glibc's mmap threshold at `nbytes` for this process (and the children it forks). -> True when
    set, False without glibc (nothing to do there)."""
    libc = _glibc()
    if libc is None:
        return False
    if libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(int(nbytes))) != 1:
        raise OSError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) refused by glibc")
    return True

"""Which torch device a stage runs on (the GPU when there is one, the CPU when not) and in which precision."""
import torch


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    pass


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but torch sees no CUDA device")
    return device


def resolve_precision(precision, device):
    """'auto' -> fp32 on the CPU, bf16 on CUDA when supported else fp16; refuses what the device cannot run.

    fp16 on the CPU is refused (torch's CPU kernels are bf16's, fp16 there is slow and partial)."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision == "auto":
        if kind != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if kind == "cpu" and precision == "fp16":
        raise DeviceError("--precision fp16 on the CPU: use bf16 or fp32 there")
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise DeviceError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return precision


def autocast(device, precision):
    """The autocast context encoders run under: disabled for fp32 (exact, batch-stable)."""
    kind = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=AUTOCAST_DTYPES[precision])


GLIBC_M_TRIM_THRESHOLD, GLIBC_M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory_mapped(limit=1 << 30):
    """Raise glibc's mmap and trim thresholds to `limit` bytes for this process; True when applied.

    By default glibc hands every freed block above 32 MiB back to the OS, so each CPU forward of a conv
    net maps its activations afresh and faults them in page by page. Measured here (EfficientNet-Lite0,
    32 images of 224 x 224, 1 thread): 14.6 images/s with 8.4 s of system time per 4.7 s of user time
    by default, 45 images/s with the thresholds at 1 GiB, for ~0.3 GiB more peak memory there and
    ~0.7 GiB more over the demo's extract (3.0 vs 2.3 GiB: freed blocks are kept). Only a speed setting: on a libc without mallopt (not glibc) nothing changes and False is returned.
    """
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(GLIBC_M_TRIM_THRESHOLD, limit))

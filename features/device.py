"""Which torch device a stage runs on: the GPU when there is one, the CPU when not."""
import torch


class DeviceError(RuntimeError):
    pass


def resolve_device(device="auto"):
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda asked for, but torch sees no CUDA device")
    return device

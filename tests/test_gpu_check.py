"""bench/gpu_check.py: its helpers on small arrays (fast), its fail-fast refusals (fast), and a whole CPU dry
run on fashion (slow: ~4-6 min on the 2-core machine, since bf16 on a CPU without native bf16 is ~10x slower
than fp32 and every stage is a fresh `python run.py` process; skipped when ../shared/data/fashion is absent)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion"
NEEDS_FASHION = pytest.mark.skipif(not (FASHION / "annotations" / "labeled.json").is_file(),
                                   reason=f"real data not found at {FASHION} (read-only share absent on this machine)")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load()


def test_masked_cosines_only_count_masked_entries():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 2, 5)).astype(np.float32)
    b = a.copy()
    b[0] *= 2.0                      # same direction: 1
    b[1, 0] = -a[1, 0]               # first entry opposite, second masked out: -1
    b[1, 1] = rng.normal(size=5)
    mask = np.array([[True, True], [True, False], [False, False]])
    cos = gc.masked_cosines(a, b, mask)
    assert cos[0] == pytest.approx(1.0, abs=1e-6)
    assert cos[1] == pytest.approx(-1.0, abs=1e-6)
    assert np.isnan(cos[2])          # nothing valid: not counted


def _store(path, ids, frames, pooled, tokens):
    with h5py.File(path, "w") as h5:
        h5["ids"] = np.array(ids, dtype="S")
        h5["frame_emb"], h5["frame_mask"] = frames.astype(np.float16), np.ones(frames.shape[:2], bool)
        h5["text_pooled"], h5["text_field_mask"] = pooled.astype(np.float16), np.ones(pooled.shape[:2], bool)
        h5["text_tokens"], h5["text_token_mask"] = tokens.astype(np.float16), np.ones(tokens.shape[:2], bool)
        h5["label_fine"] = np.arange(len(ids), dtype=np.int32) % 2


def test_compare_stores_and_store_differences(tmp_path):
    rng = np.random.default_rng(1)
    frames, pooled, tokens = rng.normal(size=(5, 1, 8)), rng.normal(size=(5, 3, 4)), rng.normal(size=(5, 6, 4))
    _store(tmp_path / "a.h5", list("abcde"), frames, pooled, tokens)
    _store(tmp_path / "b.h5", list("abcde"), frames + 0.01 * rng.normal(size=frames.shape), pooled, tokens)
    out = gc.compare_stores(tmp_path / "a.h5", tmp_path / "b.h5", rows_per_read=2)
    assert out["text_pooled"]["cos_min"] == pytest.approx(1.0, abs=1e-6)
    assert out["text_pooled"]["max_abs_diff"] == 0
    assert 0.99 < out["frame_emb"]["cos_min"] < 1.0 and out["frame_emb"]["items"] == 5
    assert all(v["mask_differs"] == 0 for v in out.values())
    diffs = gc.store_differences(tmp_path / "a.h5", tmp_path / "a.h5")
    assert diffs and all(v == 0.0 for v in diffs.values())
    _store(tmp_path / "c.h5", list("abcdx"), frames, pooled, tokens)
    with pytest.raises(ValueError, match="other videos"):
        gc.compare_stores(tmp_path / "a.h5", tmp_path / "c.h5")


def test_marginal_rate_and_small_runs():
    assert gc.marginal_rate(100, 12.0, 10, 3.0) == pytest.approx(10.0)
    assert gc.marginal_rate(100, 3.0, 10, 3.5) is None        # within noise: no figure, never a negative one
    assert gc.small_n(2000) == 32 and gc.small_n(8) == 2
    flags = dict(zip(*[iter(gc.codebook_flags(24))] * 2))
    assert max(flags["--pca-dim"], flags["--clusters"], flags["--gmm-components"]) <= 24


def test_format_table_of_partial_results():
    res = {"args": {"items": 10, "holdout": 4, "frames": 1, "models": "mlp", "folds": 3, "epochs": 1},
           "machine": {"gpu_count": 0, "device": "cpu", "torch": "x", "cuda": None, "cpu_count": 2},
           "train_precision": "fp32", "total_s": 1.0, "failures": ["extract bf16: exit 1"],
           "stages": {"1_extract": {"fp32": {"bare": {"frame_videos_per_s": 5.0, "all_videos_per_s": 4.0}}},
                      "2_precision": {"skipped": "an extract of stage 1 did not finish"},
                      "3_pipeline": {"skipped": "no store"}, "4_two_process": {"skipped": "0 GPU(s)"}}}
    text = gc.format_table(res)
    assert "1 bare frame encoder forward" in text and "5.0" in text
    assert "skipped: no store" in text and "failures: extract bf16: exit 1" in text


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_refuses_missing_data_at_once(tmp_path):
    proc = _run("--device", "cpu", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "cannot run" in proc.stderr and "nowhere/annotations/labeled.json not found" in proc.stderr
    assert proc.stdout.splitlines()[0].startswith("gpu_check: needs:")      # what it needs, first


@NEEDS_FASHION
def test_refuses_cuda_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = _run("--device", "cuda", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--device cpu" in proc.stderr


@pytest.mark.slow
@NEEDS_FASHION
def test_cpu_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run("--device", "cpu", "--items", "24", "--holdout", "8", "--models", "mlp,linear", "--epochs", "1",
                "--out", str(out), "--work", str(work), "--two-process", "off", "--budget", "900", timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["failures"] == []
    st1 = res["stages"]["1_extract"]
    for p in ("bf16", "fp32"):
        assert st1[p]["bare"]["frame_videos_per_s"] > 0 and st1[p]["bare"]["all_videos_per_s"] > 0
        assert st1[p]["extract"]["videos_per_s"] > 0 and st1[p]["extract"]["ratio_wall_to_bare_all"] > 0
        assert st1[p]["extract"]["marginal_videos_per_s"] is None or st1[p]["extract"]["marginal_videos_per_s"] > 0
    cos = res["stages"]["2_precision"]["cosines"]
    for name, c in cos.items():
        assert -1 <= c["cos_min"] <= c["cos_mean"] <= 1 and c["items"] > 0, name
        assert c["cos_min"] > 0.99, (name, c)             # bf16 vs fp32: close
        assert c["mask_differs"] == 0
    lr = res["stages"]["2_precision"]["logreg"]
    assert 0 <= lr["changed_bf16_features"] <= 0.5
    st3 = res["stages"]["3_pipeline"]
    for stage in ("aggregates", "train_neural", "stack", "predict_small", "predict"):
        assert st3[stage]["ok"] and st3[stage]["wall_s"] > 0, stage
    assert set(st3["oof_mean_f1"]) == {"mlp", "linear"}
    assert st3["predict_rates"]["videos_per_s"] > 0 and 0 <= st3["predict_rates"]["accuracy"] <= 1
    assert res["stages"]["4_two_process"] == {"skipped": "--two-process off"}
    table = (out / "gpu_check.txt").read_text()
    assert "failures: none" in table and "2 bf16 vs fp32 cosine per item frame_emb" in table
    assert not work.exists()                              # bulky stores removed without --keep-work


def test_gpu_providers_skipped_with_their_reason():
    """Stage 5 (onnxruntime-gpu / TensorRT) never fails a machine without them: each provider is skipped
    saying why (the device, or the providers onnxruntime lists), and the table shows the reasons and figures."""
    assert "--device cuda" in gc.provider_skip_reason("CUDAExecutionProvider", "cpu", ["CPUExecutionProvider"])
    why = gc.provider_skip_reason("CUDAExecutionProvider", "cuda", ["CPUExecutionProvider"])
    assert "not CUDAExecutionProvider" in why and "onnxruntime-gpu" in why
    assert "TensorRT" in gc.provider_skip_reason("TensorrtExecutionProvider", "cuda", ["CUDAExecutionProvider"])
    assert "not installed" in gc.provider_skip_reason("CUDAExecutionProvider", "cuda", None)
    assert gc.provider_skip_reason("CUDAExecutionProvider", "cuda", ["CUDAExecutionProvider"]) is None
    args = type("Args", (), {"device": "cpu"})()
    st5 = gc.gpu_runtime_stage(args, None, Path("unused"), runner=None)      # returns before any work
    assert set(st5) == set(gc.GPU_PROVIDERS) and all("--device cpu" in r["skipped"] for r in st5.values())
    res = {"args": {"items": 10, "holdout": 4, "frames": 1, "models": "mlp", "folds": 3, "epochs": 1},
           "machine": {"gpu_count": 1, "device": "cuda", "torch": "x", "cuda": "12", "cpu_count": 2},
           "train_precision": "bf16", "total_s": 1.0, "failures": [],
           "stages": {"5_runtime_gpu": {"torch_bf16_images_per_s": 900.0, "torch_fp32_images_per_s": 500.0,
                                        "CUDAExecutionProvider": {"precision": "fp32", "images_per_s": 1200.0,
                                                                  "cos_min": 0.99998, "cos_mean": 0.99999,
                                                                  "speedup_vs_torch_bf16": 1.333},
                                        "TensorrtExecutionProvider": {"skipped": "no TensorRT"}}}}
    text = gc.format_table(res)
    assert "1200.0 images/s (fp32), 1.33x torch bf16" in text and "skipped: no TensorRT" in text
    assert "5 frame encoder on torch bf16, images/s" in text

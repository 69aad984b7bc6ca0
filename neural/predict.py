"""Fold models of a run directory -> probabilities for any store (used by train-neural and `predict`)."""
from pathlib import Path

import numpy as np
import torch

from features.device import resolve_device
from features.store import StoreReader
from neural.data import StoreBatches, model_inputs
from neural.models import build_model
from neural.outputs import RunError, read_run
from neural.train import predict_batches


def codebook_path(cache_dir):
    return Path(cache_dir) / "codebook.h5"


def load_fold_models(run_dir, model, device):
    """The K fold models of one model name, in eval mode, and their spec."""
    run = read_run(run_dir)
    models, spec = [], None
    for k in range(run["n_folds"]):
        path = Path(run_dir) / model / f"fold{k}.pt"
        if not path.exists():
            raise RunError(f"{path}: fold checkpoint missing; rerun `python run.py train-neural` to finish it")
        ckpt = torch.load(path, map_location=device, weights_only=False)
        spec = ckpt["spec"]
        net = build_model(spec, codebook_path(run["cache_dir"])).to(device)
        net.load_state_dict(ckpt["state_dict"])
        models.append(net.eval())
    return models, spec


def check_classes(reader, run):
    if reader.fine_classes != run["fine_classes"]:
        raise RunError(f"{reader.path}: its fine classes differ from those of the run "
                       f"({len(reader.fine_classes)} vs {len(run['fine_classes'])}); extract it with the same category map")


def predict_split(models, spec, reader, batch_size, device, num_workers=0):
    """Yield (rows, proba) batches of every row of a store, averaged over the fold models."""
    names = model_inputs(spec["model"], reader, spec.get("aggregates"))
    dataset = StoreBatches(reader, names, max_tokens=spec.get("max_tokens"))
    yield from predict_batches(models, dataset, np.arange(len(reader)), batch_size, device, num_workers)


def predict_store(run_dir, store_path, models=None):
    """{model name: (N, C) float32 probabilities averaged over the fold models} for a store."""
    run = read_run(run_dir)
    reader = StoreReader(store_path)
    check_classes(reader, run)
    device = resolve_device()
    out = {}
    for name in models or run["models"]:
        fold_models, spec = load_fold_models(run_dir, name, device)
        proba = np.zeros((len(reader), len(run["fine_classes"])), np.float32)
        for rows, p in predict_split(fold_models, spec, reader, run["options"]["batch_size"], device):
            proba[rows] = p
        out[name] = proba
    return out

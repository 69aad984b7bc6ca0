"""Fold models of a run directory -> probabilities for any store (used by train-neural and `predict`).

Needs only RUN_DIR/run.json and RUN_DIR/<model>/fold<k>.{safetensors,json}: no cache file, no
predictions.h5 (the packaged model directory holds exactly that under neural/)."""
from pathlib import Path

import numpy as np

from core.device import resolve_device
from features.store import StoreReader
from neural.checkpoint import load_fold
from neural.data import StoreBatches
from neural.models import model_inputs
from neural.options import NeuralOptions
from neural.outputs import RunError, read_run
from neural.train import predict_batches


def load_fold_models(run_dir, model, n_folds, device):
    """The n_folds fold models of one model name, in eval mode, and their (common) ModelSpec."""
    models, specs = [], []
    for k in range(n_folds):
        net, spec, _ = load_fold(Path(run_dir) / model, k, device)
        models.append(net)
        specs.append(spec)
    if any(s != specs[0] for s in specs):
        raise RunError(f"{Path(run_dir) / model}: its fold models were built from different specs; retrain it")
    return models, specs[0]


def check_classes(reader, run):
    if reader.fine_classes != run["fine_classes"]:
        raise RunError(f"{reader.path}: its fine classes differ from those of the run "
                       f"({len(reader.fine_classes)} vs {len(run['fine_classes'])}); extract it with the same category map")


def predict_split(models, spec, reader, batch_size, device, num_workers=0):
    """Yield (rows, proba) batches of every row of a store, averaged over the fold models."""
    names = model_inputs(spec.model, reader, spec.aggregates)
    dataset = StoreBatches(reader, names, max_tokens=spec.max_tokens)
    yield from predict_batches(models, dataset, np.arange(len(reader)), batch_size, device, num_workers)


def predict_store(run_dir, store_path=None, models=None, reader=None, device="auto"):
    """{model name: (N, C) float32 probabilities averaged over the fold models} for a store, given by its
    path or as an open StoreReader (`reader=`, left open), on `device` (auto | cpu | cuda)."""
    run = read_run(run_dir)
    if reader is None:
        with StoreReader(store_path) as opened:
            return predict_store(run_dir, models=models, reader=opened, device=device)
    check_classes(reader, run)
    device, batch_size = resolve_device(device), NeuralOptions.from_dict(run["options"]).batch_size
    out = {}
    for name in models or run["models"]:
        fold_models, spec = load_fold_models(run_dir, name, run["n_folds"], device)
        proba = np.zeros((len(reader), len(run["fine_classes"])), np.float32)
        for rows, p in predict_split(fold_models, spec, reader, batch_size, device):
            proba[rows] = p
        out[name] = proba
    return out

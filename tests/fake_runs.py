"""A small fake RUN_DIR (the "Neural run directory" contract) for the stacking tests.

Two base models with complementary strengths: model "a" sees the first half of the classes clearly
and the rest dimly, model "b" the reverse, so a stacker that learns whom to trust per class beats
both and their average. Probabilities are noisy one-hot labels pushed through a softmax.
"""
import json
from pathlib import Path

import h5py
import numpy as np

from features.store import StoreReader
from neural.folds import make_folds
from tests.fakes import write_fake_store


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fake_proba(label, n_classes, strong, rng, clear=3.0, dim=0.5, confuse=2.5, noise=1.0):
    """(N, C) probabilities: a clear signal for the classes in `strong`; elsewhere a dim one, and a
    systematic confusion with the next class that only a stacker can learn to discount."""
    weak = ~np.isin(label, strong)
    logits = rng.normal(scale=noise, size=(len(label), n_classes))
    logits[np.arange(len(label)), label] += np.where(weak, dim, clear)
    logits[np.flatnonzero(weak), (label[weak] + 1) % n_classes] += confuse
    return softmax(logits)


def write_predictions(path, ids, label, oof, split_probas, n_folds=3, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    strings = h5py.string_dtype()
    with h5py.File(path, "w") as h5:
        h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=strings)
        h5.create_dataset("label_fine", data=np.asarray(label, np.int32))
        h5.create_dataset("oof_proba", data=oof)
        for split, (split_ids, proba) in split_probas.items():
            h5.create_dataset(f"ids_{split}", data=np.array(split_ids, dtype=object), dtype=strings)
            h5.create_dataset(f"proba/{split}", data=proba)
        h5.attrs["complete"] = True
        h5.attrs["metrics"] = "{}"
        h5.attrs["options"] = json.dumps({"n_folds": n_folds, "seed": seed})
        h5.create_dataset("fold_done", data=np.ones(n_folds, bool))


def write_fake_run(root, n=240, n_test=60, n_classes=6, n_folds=3, models=("a", "b"), seed=0):
    """CACHE (labeled.h5, test.h5) and RUN_DIR under root; returns (run_dir, test_label (N_test,))."""
    root = Path(root)
    cache, run_dir = root / "cache", root / "run"
    label = write_fake_store(cache / "labeled.h5", n=n, n_classes=n_classes, seed=seed)
    test_label = write_fake_store(cache / "test.h5", n=n_test, n_classes=n_classes, split="test",
                                  labelled=False, seed=seed + 1)
    reader = StoreReader(cache / "labeled.h5")
    ids, test_ids = reader.ids, StoreReader(cache / "test.h5").ids
    fold = make_folds(label, n_folds, seed)
    run_dir.mkdir(parents=True)
    with h5py.File(run_dir / "folds.h5", "w") as h5:
        h5.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype())
        h5.create_dataset("fold", data=fold.astype(np.int8))
        h5.attrs["n_folds"], h5.attrs["seed"] = n_folds, seed
    rng = np.random.default_rng(seed)
    halves = np.array_split(np.arange(n_classes), len(models))
    for m, name in enumerate(models):
        oof = fake_proba(label, n_classes, halves[m], rng)
        test = fake_proba(test_label, n_classes, halves[m], rng)
        write_predictions(run_dir / name / "predictions.h5", ids, label, oof, {"test": (test_ids, test)},
                          n_folds, seed)
    run = {"cache_dir": str(cache.resolve()), "store_config": reader.config,
           "fine_classes": reader.fine_classes, "coarse_classes": reader.coarse_classes,
           "fine_to_coarse": reader.fine_to_coarse.tolist(), "options": {}, "seed": seed,
           "n_folds": n_folds, "models": list(models)}
    (run_dir / "run.json").write_text(json.dumps(run, indent=1))
    reader.close()
    return run_dir, test_label

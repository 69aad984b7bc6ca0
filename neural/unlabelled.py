"""Which store is the unlabelled split a run learns from (pseudo-labels, pretraining), and its identity.

The rule: `--unlabeled SPLIT` names CACHE_DIR/<SPLIT>.h5; without it, CACHE_DIR/unlabeled.h5 is used when
the cache has one. A named split that is missing, the labelled split itself, or a store made with other
classes or another feature identity than the labelled store is refused, naming the file.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core import schema
from core.records import options_diff
from features.store import StoreReader, feature_identity
from neural.outputs import RunError

DEFAULT_SPLIT = "unlabeled"                 # the challenge's (and the demo's) unlabelled split


@dataclass
class Unlabelled:
    split: str
    path: Path
    n_videos: int
    named: bool                     # named by --unlabeled (else found by the default rule)
    digest: str                     # sha256 of the store's config and ids (store_digest)

    def record(self):
        """What a run records about the unlabelled data its models saw (run.json, predictions.h5)."""
        return {"split": self.split, "store": str(self.path), "n_videos": self.n_videos, "digest": self.digest}


def store_digest(reader):
    """sha256 of a store's config and its ids: the same digest means the same videos, the same features."""
    h = hashlib.sha256(json.dumps(reader.config, sort_keys=True).encode())
    h.update("\n".join(reader.ids).encode())
    return h.hexdigest()


def unlabelled_path(cache_dir, name):
    """(split, CACHE_DIR/<split>.h5) of the unlabelled split by the rule above, or None when none is named
    and the cache has no unlabeled.h5; a named split without a store, or the labelled split, is refused."""
    split = name or DEFAULT_SPLIT
    path = schema.store_path(cache_dir, split)
    if split == schema.LABELLED_SPLIT:
        raise RunError(f"{path}: --unlabeled names the labelled split; name a split of unlabelled videos")
    if not path.exists():
        if name:
            raise RunError(f"{path}: no store for the unlabelled split '{name}' named by --unlabeled; "
                           f"extract it first (python run.py extract --split {name})")
        return None
    return split, path


def open_unlabelled(cache_dir, name, labelled_reader):
    """The unlabelled store (Unlabelled) or None (unlabelled_path); it must share the labelled store's
    classes and feature identity."""
    found = unlabelled_path(cache_dir, name)
    if found is None:
        return None
    split, path = found
    with StoreReader(path) as reader:
        if reader.fine_classes != labelled_reader.fine_classes:
            raise RunError(f"{path}: its fine classes differ from those of {labelled_reader.path} "
                           f"({len(reader.fine_classes)} vs {len(labelled_reader.fine_classes)}); "
                           "extract it with the same category map")
        diff = options_diff(feature_identity(labelled_reader.config), feature_identity(reader.config))
        if diff:
            raise RunError(f"{path}: made with other encoders or options than {labelled_reader.path} "
                           f"({diff}); extract it with the same options")
        return Unlabelled(split, path, len(reader), bool(name), store_digest(reader))


def describe_unlabelled(cache_dir, name, uses):
    """One line for train-neural: which unlabelled split the run uses and for what (`uses`, e.g.
    ['pseudo-labels from TEACHER']); None when there is none and nothing would use it."""
    found = unlabelled_path(cache_dir, name)
    if found is None:
        return ("unlabelled split: none (no unlabeled.h5 in the cache; name one with --unlabeled), so "
                f"no {' and no '.join(uses)}") if uses else None
    split, path = found
    how = "named by --unlabeled" if name else "found in the cache"
    return (f"unlabelled split: {split} ({path.name}, {how}), "
            + (f"used for {' and '.join(uses)}" if uses else "not learnt from (no --teacher)"))

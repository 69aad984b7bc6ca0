"""The contract of a model: FoldModel (built from its ModelSpec alone, optionally initialised from a
FitContext), ModelEntry, its line in the registry (neural/models/__init__.py), and Params, its own
parameters declared as a dataclass (defaults and one line of help each, via `param`)."""
from dataclasses import dataclass, field, fields
from typing import Any

import torch.nn as nn


@dataclass
class FitContext:
    """What a model may learn from before its first step (FoldModel.initialise): the training rows of
    the fold, and the cache files its registry entry asks for."""
    dataset: Any                       # neural.data.StoreBatches over the labelled store
    rows: Any                          # (N_train,) store rows of this fold's training data
    batch_size: int
    codebook: Any = None               # features.codebook.Codebook, when the entry needs_codebook
    class_names: Any = None            # features.class_names.ClassNames, when the entry needs_class_names
    pretrained: Any = None             # neural.pretrain.Pretrained (loaded after initialise), or None
    pseudo: Any = None                 # neural.pseudo.PseudoLabels of this fold (a student), or None


class FoldModel(nn.Module):
    """Built from a ModelSpec alone (so a checkpoint's tensors always fit it); forward maps a batch dict
    to (fine logits (B, C), coarse logits (B, C1)); everything it learned lives in its state dict."""

    def initialise(self, context):
        """Called once before training (FitContext); the default keeps the random initialisation."""

    def size_from(self, tensors):
        """Before a checkpoint's tensors are checked and loaded: resize the buffers whose size was learned,
        not given by the spec (knn's bank: the fold's training rows); the default has none."""

    @classmethod
    def params_from_cache(cls, params, codebook=None):
        """The Params a new spec records, completed from the cache files the entry asks for (vlad: its
        pooling's sizes from codebook.h5); the default keeps them."""
        return params


def param(default, help, fixed=""):
    """A declared model parameter: its default and one line of help (`train-neural --help`). fixed: where
    its value comes from when not from --param (e.g. "codebook.h5"); such a parameter is not settable."""
    return field(default=default, metadata={"help": help, "fixed": fixed})


@dataclass
class NoParams:
    """A model without parameters of its own."""


def settable(params_cls):
    """[(name, type, default, help)] of the parameters --param may set, in declaration order."""
    return [(f.name, f.type, f.default, f.metadata.get("help", "")) for f in fields(params_cls)
            if not f.metadata.get("fixed")]


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry: its name, its class, the store datasets it reads and what else it needs."""
    name: str
    cls: type                          # a FoldModel subclass, cls(spec)
    inputs: tuple                      # store dataset names it reads (mlp adds every agg/* vector)
    help: str                          # one line for `train-neural --help`
    reads_aggregates: bool = False     # also reads every 2-D agg/* dataset of the store
    needs_codebook: bool = False       # initialised from CACHE_DIR/codebook.h5 when training
    needs_class_names: bool = False    # initialised from CACHE_DIR/class_names.h5 (not trained by default without it)
    order: int = 100                   # place in the default training order (lower first; ties by name)
    default: bool = True               # trained when --models is not given; False: only when named
    Params: type = NoParams            # its own parameters (a dataclass of `param` fields; may define check())
    legacy: tuple = ()                 # (old ModelSpec/NeuralOptions field, its Params name): old runs still load

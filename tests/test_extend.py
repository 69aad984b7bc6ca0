"""Extending without forking: a model is one new module in the models package, a stacker comes from an
installed package's entry point, and a saved file whose component is not installed is refused naming it.

One small feature-zip dataset is extracted once (as tests/test_stack_e2e.py does); each test then trains,
stacks and predicts with what it adds.
"""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import neural.models
from tests.commands import EXTRACT, REPO, SUBPROCESS_ENV, cli_ok, invoke, run_py

TRAIN = ["--folds", "3", "--epochs", "1", "--hidden", "16", "--batch-size", "16", "--threads", "1", "--workers", "0"]
STACK = ["--param", "n_rounds=10", "--param", "top_k=3", "--compare", "", "--threads", "1"]

# the whole of what a new model is: one module, its Params declared beside it
PROBE = '''
"""probe: a linear head on the mean frame times a declared scale."""
from dataclasses import dataclass

from core import schema
from neural.models import spec_params
from neural.models.base import FoldModel, ModelEntry, param
from neural.models.blocks import Heads, masked_mean


@dataclass
class ProbeParams:
    scale: float = param(1.0, "multiplies the mean frame")


class Probe(FoldModel):
    def __init__(self, spec):
        super().__init__()
        self.scale = spec_params(spec).scale
        self.heads = Heads(spec.frame_dim, spec.n_fine, spec.n_coarse, spec.dropout)

    def forward(self, batch):
        return self.heads(self.scale * masked_mean(batch[schema.FRAME_EMB].float(), batch[schema.FRAME_MASK]))


ENTRY = ModelEntry("probe", Probe, (schema.FRAME_EMB, schema.FRAME_MASK), "a linear head on the scaled mean frame",
                   order=65, Params=ProbeParams)
'''

# a user's package: a stacker, and the dist-info that registers it under shortvideo.stackers
MEDIAN = '''
import numpy as np

from stacking.stackers.base import Stacker


class MedianStacker(Stacker):
    kind = "median"
    summary = "the median of the base models, renormalised"

    def fit(self, X, y):
        self.n_classes_ = X.n_classes
        return self

    def predict_proba(self, X):
        p = np.median(X.probas, axis=0)
        return p / p.sum(axis=1, keepdims=True)
'''


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A feature-zip dataset (36 labelled, 8 test videos) and its cache."""
    from demo.synthetic import generate_feature_zip_dataset
    root = tmp_path_factory.mktemp("extend")
    data, cache = root / "data", root / "cache"
    generate_feature_zip_dataset(data, 36, n_frames=4, dim=16, split="labeled", n_classes=4, signal=1.0,
                                 tail_ratio=3.0, progress=False)
    generate_feature_zip_dataset(data, 8, n_frames=4, dim=16, split="test", n_classes=4, with_labels=False,
                                 progress=False)
    cli_ok("extract", "--data", data, "--out", cache, *EXTRACT)
    return {"root": root, "data": data, "cache": cache}


@pytest.fixture
def probe_model(tmp_path, monkeypatch):
    """The models package read from a copy of its folder with one new module, probe.py, written there."""
    models = tmp_path / "models"
    shutil.copytree(Path(neural.models.__file__).parent, models, ignore=shutil.ignore_patterns("__pycache__"))
    (models / "probe.py").write_text(PROBE)
    monkeypatch.setattr(neural.models, "__path__", [str(models)])
    neural.models.rediscover()
    yield
    sys.modules.pop("neural.models.probe", None)
    monkeypatch.undo()
    neural.models.rediscover()


def train_and_stack(extracted, root, models, *extra):
    run, stack = root / "run", root / "stack"
    cli_ok("train-neural", "--cache", extracted["cache"], "--out", run, "--models", models, *TRAIN, *extra)
    cli_ok("stack", "--run", run, "--out", stack, *STACK)
    return run, stack


def test_a_model_added_as_one_module_trains_stacks_and_predicts(extracted, tmp_path, probe_model):
    assert "probe" in neural.models.MODEL_NAMES and "probe" in neural.models.DEFAULT_MODELS
    assert "probe: a linear head" in neural.models.models_help()
    help_text = " ".join(invoke("train-neural", "--help").output.split())
    assert "probe: scale=1.0 (multiplies the mean frame)" in help_text
    run, stack = train_and_stack(extracted, tmp_path, "linear,probe", "--param", "probe.scale=2.5")
    record = json.loads((run / "probe" / "fold0.json").read_text())
    assert record["spec"]["params"] == {"scale": 2.5}
    assert record["component"]["module"] == "neural.models.probe"
    assert record["component"]["package"] == "shortvideo-classifier"
    out = tmp_path / "pred.csv"
    cli_ok("predict", "--data", extracted["data"], "--split", "test", "--model", stack / "model", "--out", out,
           "--cache", tmp_path / "pred_cache")
    assert out.read_text() == (stack / "submission.csv").read_text()
    bad = invoke("train-neural", "--cache", extracted["cache"], "--out", tmp_path / "bad", "--models", "probe",
                 "--param", "probe.scal=2", *TRAIN)
    assert bad.exit_code == 2 and "no settable parameter 'scal' of probe" in bad.output


def test_a_model_directory_naming_a_model_not_installed_is_refused_naming_it(extracted, tmp_path, probe_model):
    _, stack = train_and_stack(extracted, tmp_path, "linear,probe")
    sys.modules.pop("neural.models.probe")
    neural.models.__path__ = [str(Path(REPO) / "neural" / "models")]        # the package without probe.py
    neural.models.rediscover()
    result = invoke("predict", "--data", extracted["data"], "--split", "test", "--model", stack / "model",
                    "--out", tmp_path / "pred.csv", "--cache", tmp_path / "pred_cache")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "probe/fold0.json: model 'probe' was made by module neural.models.probe of package " \
           "shortvideo-classifier" in result.output and "not installed here" in result.output
    assert not (tmp_path / "pred.csv").exists()


def write_user_package(site):
    """site/: the package shortvideo_median (one stacker) and its dist-info with entry_points.txt, as
    `pip install` of a package declaring [options.entry_points] shortvideo.stackers would leave them."""
    (site / "shortvideo_median").mkdir(parents=True)
    (site / "shortvideo_median" / "__init__.py").write_text(MEDIAN)
    info = site / "shortvideo_median-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shortvideo-median\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [shortvideo.stackers]
        median = shortvideo_median:MedianStacker
        """))


def test_a_stacker_from_an_installed_entry_point_is_used_by_stack_and_refused_where_not_installed(
        extracted, tmp_path):
    run = tmp_path / "run"
    cli_ok("train-neural", "--cache", extracted["cache"], "--out", run, "--models", "linear,mlp", *TRAIN)
    site = tmp_path / "site"
    write_user_package(site)
    env = dict(SUBPROCESS_ENV, PYTHONPATH=f"{site}:{REPO}")
    stack = tmp_path / "stack"
    done = subprocess.run(run_py("stack", "--run", run, "--out", stack, "--stacker", "median", "--compare", "",
                                 "--threads", "1"), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((stack / "stacker" / "stacker.json").read_text())
    assert saved["kind"] == "median"
    assert saved["component"] == {"module": "shortvideo_median", "package": "shortvideo-median", "version": "1.2"}
    # this process has no such package: the model directory is refused, naming the stacker and its package
    result = invoke("predict", "--data", extracted["data"], "--split", "test", "--model", stack / "model",
                    "--out", tmp_path / "pred.csv", "--cache", tmp_path / "pred_cache")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "stacker 'median' was made by module shortvideo_median of package shortvideo-median 1.2" in result.output


def toy_frame_encoder(spec, rest, device):
    """A user's frame encoder loader: the mean colour per channel, times a scale given after the family."""
    import torch

    from features.encoders import FrameEncoder, ImagePreprocess

    class MeanColour(torch.nn.Module):
        def forward(self, images):                                   # (B, 3, H, W) -> (B, 3)
            return images.mean(dim=(2, 3)) * float(rest)
    return FrameEncoder(spec, MeanColour(), 3, 8, ImagePreprocess(8), checksum="toy", device=device)


def test_an_encoder_family_from_an_installed_entry_point_is_built_by_the_factory(monkeypatch):
    import torch
    from importlib import metadata

    import core.components
    from features.encoders import EncoderError, build_frame_encoder, build_text_encoder
    point = metadata.EntryPoint("toy", f"{__name__}:toy_frame_encoder", "shortvideo.frame_encoders")
    monkeypatch.setattr(core.components.metadata, "entry_points",
                        lambda group: [point] if group == point.group else [])
    encoder = build_frame_encoder("toy:2", precision="fp32")
    assert encoder.dim == 3
    torch.testing.assert_close(encoder.encode(torch.ones(2, 3, 8, 8)), torch.full((2, 3), 2.0))
    with pytest.raises(EncoderError, match="shortvideo.text_encoders"):   # a frame family is not a text one
        build_text_encoder("toy:2")


OLD_FLAT = {"vlad_pooling": "netvlad", "vlad_pca_dim": 8, "vlad_clusters": 4, "vlad_expansion": 2, "vlad_groups": 4,
            "knn_k": 7, "knn_temperature": 0.1, "knn_dim": 8}      # every model's spec carried these before


def test_a_fold_record_written_before_models_declared_parameters_still_loads(linear_run, tmp_path):
    from neural.checkpoint import load_fold
    from neural.spec import ModelSpec
    run = tmp_path / "run"
    shutil.copytree(linear_run, run)
    path = run / "linear" / "fold0.json"
    record = json.loads(path.read_text())
    spec = record["spec"]
    spec.pop("params")
    record.pop("component")
    path.write_text(json.dumps({**record, "spec": {**spec, **OLD_FLAT}}))
    model, loaded, _ = load_fold(run / "linear", 0)
    assert loaded.params == {} and loaded.n_fine == spec["n_fine"]          # other models' fields dropped
    knn = ModelSpec.from_dict({**spec, **OLD_FLAT, "model": "knn"})
    assert knn.params == {"k": 7, "temperature": 0.1, "dim": 8}
    vlad = ModelSpec.from_dict({**spec, **OLD_FLAT, "model": "vlad"})
    assert vlad.params == {"pooling": "netvlad", "pca_dim": 8, "clusters": 4, "expansion": 2, "groups": 4}


def test_old_flat_run_options_become_model_params_left_out_at_their_default():
    from neural.options import NeuralOptions
    old = NeuralOptions.from_dict({"epochs": 3, "vlad_pooling": "nextvlad", "knn_k": 20, "knn_temperature": 0.1,
                                   "knn_dim": 8})
    assert old.params == {"knn.dim": 8} and old.epochs == 3


@pytest.mark.parametrize("pooling", ["netfv", "softdbow"])
def test_every_pooling_of_features_pooling_trains_in_vlad_and_its_checkpoint_rebuilds_from_the_spec(
        fake_cache, tmp_path, pooling):
    """A pooling is one class in features/pooling.py (POOLINGS): vlad trains any of them, sized from the
    codebook, and a saved fold model is rebuilt from its spec alone."""
    from neural.checkpoint import load_fold
    from neural.options import NeuralOptions
    from neural.pipeline import train_neural
    from tests.fakes import TINY
    train_neural(fake_cache, tmp_path / "run", ["vlad"], NeuralOptions(**TINY, threads=1,
                                                                         params={"vlad.pooling": pooling}))
    model, spec, _ = load_fold(tmp_path / "run" / "vlad", 0)
    assert spec.params["pooling"] == pooling and spec.params["pca_dim"] > 0
    assert type(model.pooling.pool).__name__ == {"netfv": "NetFV", "softdbow": "SoftDBoW"}[pooling]


def test_a_model_from_an_installed_package_is_discovered_and_its_files_name_that_package(
        fake_cache, tmp_path, monkeypatch):
    """A user's package registers a model module under shortvideo.models (entry_points.txt in its
    dist-info): the registry finds it, and its fold records name the package and version."""
    from neural.checkpoint import load_fold
    from neural.options import NeuralOptions
    from neural.pipeline import train_neural
    from tests.fakes import TINY
    site = tmp_path / "site"
    (site / "user_models").mkdir(parents=True)
    (site / "user_models" / "__init__.py").write_text("")
    (site / "user_models" / "scaled.py").write_text(PROBE.replace('"probe"', '"scaled"'))
    info = site / "user_models-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: user-models\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[shortvideo.models]\nscaled = user_models.scaled\n")
    monkeypatch.syspath_prepend(str(site))
    neural.models.rediscover()
    try:
        assert neural.models.model_origin("scaled") == {"module": "user_models.scaled", "package": "user-models",
                                                         "version": "0.3"}
        train_neural(fake_cache, tmp_path / "run", ["scaled"], NeuralOptions(**TINY, threads=1,
                                                                             params={"scale": 0.5}))
        _, spec, record = load_fold(tmp_path / "run" / "scaled", 1)
        assert spec.params == {"scale": 0.5} and record["component"]["package"] == "user-models"
    finally:
        monkeypatch.undo()
        for name in ("user_models.scaled", "user_models"):
            sys.modules.pop(name, None)
        neural.models.rediscover()
    assert "scaled" not in neural.models.MODEL_NAMES

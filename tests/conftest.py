"""Shared fixtures, built once per test session: treat them as read-only (copy one before changing it).

fake_cache  a feature cache of fake stores: labeled.h5 (60 videos, 6 classes) with class_names.h5, test.h5
            (20), their aggregates and codebook.h5
linear_run  a finished train-neural run of the linear model on fake_cache, with tests.fakes.TINY options
"""
import pytest

from tests.fakes import TINY, add_aggregates, write_fake_store


@pytest.fixture(scope="session")
def fake_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("fake_cache")
    write_fake_store(d / "labeled.h5", n=60, class_names_path=d / "class_names.h5")
    write_fake_store(d / "test.h5", n=20, split="test", labelled=False, seed=1)
    add_aggregates(d, ["labeled", "test"])
    return d


@pytest.fixture(scope="session")
def linear_run(fake_cache, tmp_path_factory):
    from neural.options import NeuralOptions
    from neural.pipeline import train_neural
    run = tmp_path_factory.mktemp("linear_run") / "run"
    train_neural(fake_cache, run, ["linear"], NeuralOptions(**TINY, threads=1))
    return run

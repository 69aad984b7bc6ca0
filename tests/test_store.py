import pickle

import numpy as np
import pytest

from features.store import StoreError, StoreReader, check_config
from tests.fakes import write_fake_store


def test_read_any_index_order_equals_numpy_indexing(tmp_path):
    write_fake_store(tmp_path / "labeled.h5", n=30)
    store = StoreReader(tmp_path / "labeled.h5")
    full = store.read("frame_emb", slice(None))                      # (N, F, D)
    for rows in ([5, 3, 3, 10, 11, 12, 0], [29], np.arange(30)[::-1], []):
        np.testing.assert_array_equal(store.read("frame_emb", rows), full[rows])


def test_reader_reopens_its_handle_after_pickling(tmp_path):
    write_fake_store(tmp_path / "labeled.h5", n=10)
    store = StoreReader(tmp_path / "labeled.h5")
    store.read("frame_mask", [0])
    clone = pickle.loads(pickle.dumps(store))                         # as a DataLoader worker gets it
    assert clone._h5 is None
    np.testing.assert_array_equal(clone.read("frame_mask", [1, 2]), store.read("frame_mask", [1, 2]))


def test_missing_dataset_names_the_command(tmp_path):
    write_fake_store(tmp_path / "labeled.h5", n=10)
    with pytest.raises(StoreError, match=r"'agg/netvlad' is missing; run `python run.py extract`"):
        StoreReader(tmp_path / "labeled.h5").read("agg/netvlad", [0])


def test_other_config_is_refused_with_the_difference(tmp_path):
    write_fake_store(tmp_path / "labeled.h5", n=10)
    with pytest.raises(StoreError, match=r"fake: True -> False.*--overwrite"):
        check_config(tmp_path / "labeled.h5", {"fake": False})
    with pytest.raises(StoreError, match="no feature store"):
        StoreReader(tmp_path / "test.h5")

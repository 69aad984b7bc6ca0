"""demo.synthetic_store (`python -m bench scale --store synthetic`) loads with the normal readers and has
the extract's layout, and bench.common.run_child times a stage stopped on a file (the pretrain stage) when the
file appears (fast)."""
import sys
import time

import numpy as np

from core import schema
from bench.common import run_child
from features.store import StoreReader
from demo.synthetic_store import write_synthetic_store
from neural.models import model_inputs


def test_synthetic_store_loads_with_the_store_reader_and_has_the_extract_layout(tmp_path):
    path = write_synthetic_store(tmp_path, 300, n_frames=4, frame_dim=16, n_tokens=6, text_dim=8, block=64)
    assert path == tmp_path / "labeled.h5"
    with StoreReader(path) as store:                     # refuses an incomplete store
        assert len(store) == 300 and len(store.fine_classes) == 200
        for name in ("single", "knn", "linear"):
            model_inputs(name, store)                    # every dataset these models read is there
        shapes = {name: store.read(name, slice(None)).shape for name in (
            schema.FRAME_EMB, schema.FRAME_MASK, schema.TEXT_POOLED, schema.TEXT_FIELD_MASK,
            schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK)}
        assert shapes == {schema.FRAME_EMB: (300, 4, 16), schema.FRAME_MASK: (300, 4),
                          schema.TEXT_POOLED: (300, 3, 8), schema.TEXT_FIELD_MASK: (300, 3),
                          schema.TEXT_TOKENS: (300, 6, 8), schema.TEXT_TOKEN_MASK: (300, 6)}
        frames, mask = store.read(schema.FRAME_EMB, slice(None)), store.read(schema.FRAME_MASK, slice(None))
        assert frames.dtype == np.float16 and mask[:, 0].all()        # every video has a frame
        assert not frames[~mask].any() and frames[mask].any()        # zeros exactly where masked
        label = store.read(schema.LABEL_FINE, slice(None))
        counts = np.bincount(label, minlength=200)
        assert counts.sum() == 300 and counts.max() > 5 * max(counts.min(), 1)     # a long tail
        np.testing.assert_array_equal(store.read(schema.LABEL_COARSE, slice(None)), store.fine_to_coarse[label])


def test_a_stage_stopped_on_a_file_is_timed_when_the_file_appears(tmp_path):
    marker = tmp_path / "done.json"
    child = f"import pathlib, time; time.sleep(0.5); pathlib.Path({str(marker)!r}).touch(); time.sleep(60)"
    started = time.perf_counter()
    m = run_child([sys.executable, "-c", child], None, tmp_path / "log", stop_when=marker)
    assert 0.5 <= m.wall_s < 5 and time.perf_counter() - started < 10 and m.peak_rss_mib > 0

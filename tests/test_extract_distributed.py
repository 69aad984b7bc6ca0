"""extract under torchrun (gloo, CPU): shards per rank, stitched into the store one process would write.

One dataset (96 labelled videos, 22 test ones) and its one-process stores, made in this process by the same
command, are the reference of both torchrun tests; each test starts one torchrun (the kill test's rerun is
in this process)."""
import json
import os
import runpy
import signal
import sys
import time

import h5py
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from core import schema
from core.world import World
from features import aggregates
from features.categories import load_category_map
from features.shards import ShardError, load_or_make_plan, plan_shards, stitch
from features.store import StoreDims, StoreWriter, create_store
from tests.commands import rank_pid, start, subprocess_ok, torchrun
from tests.media import make_npy_dataset

# `run.py extract` with small aggregates; the command has no flags for NeXtVLAD's groups and the aggregates'
# batch, so the script sets them: batches of 4 rows make the shard unit lcm(2, 4) = 4 rows, so each rank
# owns shards of both stages. --threads 1 (and one BLAS thread): the stores are compared bit for bit.
EXTRACT_SCRIPT = """
import dataclasses
import sys
from features import aggregates


@dataclasses.dataclass
class SmallAggregates(aggregates.AggregateOptions):
    nextvlad_groups: int = 2
    batch_size: int = 4


aggregates.AggregateOptions = SmallAggregates         # what `run.py extract` builds its options from
from run import cli
data, out = sys.argv[1:3]
cli(["extract", "--data", data, "--out", out, "--category-map", data + "/category_map.csv", "--frames", "4",
     "--max-tokens", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--threads", "1",
     "--pca-dim", "4", "--clusters", "3", "--gmm-components", "2"])
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """-> (data dir, the extract script)."""
    root = tmp_path_factory.mktemp("data")
    make_npy_dataset(root, 96)                            # 24 shards of 4 rows: rank 1 of two owns 12-23
    make_npy_dataset(root, 22, split="test", seed=1)      # 6 shards
    script = root / "extract.py"
    script.write_text(EXTRACT_SCRIPT)
    return root, script


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The reference: the script in this process (a world of size one). -> its cache directory."""
    root, script = data
    out = tmp_path_factory.mktemp("one")
    run_script(script, root, out)
    return out


def run_script(script, root, out):
    """The extract script in this process, on one BLAS thread as in its subprocesses; the aggregates'
    options class it replaces is put back."""
    argv, options = sys.argv, aggregates.AggregateOptions
    sys.argv = [str(script), str(root), str(out)]
    try:
        with threadpool_limits(1), pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, aggregates.AggregateOptions = argv, options
    assert done.value.code in (0, None)


def assert_same_store(path, expected):
    """Every dataset (values, dtype, shape, chunks) and every file attribute equal (none is a timestamp)."""
    with h5py.File(path, "r") as got, h5py.File(expected, "r") as want:
        names = []
        want.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        got_names = []
        got.visititems(lambda name, obj: got_names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(got_names) == sorted(names)
        for name in names:
            a, b = got[name], want[name]
            assert (a.dtype, a.shape, a.chunks) == (b.dtype, b.shape, b.chunks), name
            np.testing.assert_array_equal(a[()], b[()], err_msg=name)
        assert sorted(got.attrs) == sorted(want.attrs)
        for key in want.attrs:
            np.testing.assert_array_equal(got.attrs[key], want.attrs[key], err_msg=key)


def assert_same_reports(cache, expected, split="labeled"):
    got, want = (json.loads((c / f"{split}.report.json").read_text()) for c in (cache, expected))
    for key in ("n_videos", "n_videos_with_faults", "fault_counts", "text_unk", "faults"):
        assert got[key] == want[key], key


def test_two_ranks_write_the_stores_and_codebook_of_one_process_bit_for_bit(data, one_process, tmp_path):
    """Both splits' embeddings and aggregates, their reports and the codebook (which samples both splits'
    shards) equal one process's; the shards are deleted; the main rank alone prints."""
    root, script = data
    done = subprocess_ok(torchrun(2, script, root, tmp_path / "two"))
    for split in ("labeled", "test"):
        assert_same_store(tmp_path / "two" / f"{split}.h5", one_process / f"{split}.h5")
        assert_same_reports(tmp_path / "two", one_process, split)
        assert not (tmp_path / "two" / f"{split}.shards").exists(), "shards are deleted once stitched"
    assert_same_store(tmp_path / "two" / "codebook.h5", one_process / "codebook.h5")
    with h5py.File(tmp_path / "two" / "labeled.h5", "r") as h5:
        assert h5.attrs["aggregates_complete"] and h5["agg/done"][:].all()
    assert done.stdout.count("labeled: 96 videos, 2 with media faults") == 1, "only the main rank prints"


def _complete_shards(shards, indices):
    count = 0
    for i in indices:
        try:
            with h5py.File(shards / f"labeled-{i:05d}.h5", "r", locking=False) as h5:
                count += bool(h5.attrs.get("complete", False))
        except (OSError, KeyError):
            pass
    return count


def test_a_rank_killed_mid_run_resumes_with_another_world_size_to_the_same_store(data, one_process, tmp_path):
    """kill -9 rank 1 of two after some of its shards; rerun as one plain process (this one): the same
    stores and codebook."""
    root, script = data
    killed = tmp_path / "killed"
    proc = start(torchrun(2, script, root, killed))
    deadline, victim = time.time() + 300, None
    while _complete_shards(killed / "labeled.shards", range(12, 24)) < 2 and time.time() < deadline \
            and proc.poll() is None:
        victim = victim or rank_pid(proc.pid, 1)
        time.sleep(0.01)
    victim = victim or rank_pid(proc.pid, 1)
    assert victim and proc.poll() is None, "rank 1 was not caught mid-run"
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, "torchrun reports the killed rank"
    left = _complete_shards(killed / "labeled.shards", range(12, 24))
    assert 2 <= left < 12, "rank 1 was not interrupted mid-way"
    assert not (killed / "labeled.h5").exists(), "nothing is stitched from incomplete shards"

    run_script(script, root, killed)                              # world size 1 finishes the shards
    for split in ("labeled", "test"):
        assert_same_store(killed / f"{split}.h5", one_process / f"{split}.h5")
        assert_same_reports(killed, one_process, split)
    assert_same_store(killed / "codebook.h5", one_process / "codebook.h5")


def _tiny_shard(path, ids, complete):
    cmap = load_category_map(None)
    create_store(path, "labeled", ids, [-1] * len(ids), [-1] * len(ids), StoreDims(2, 3, 4, 2),
                 {"x": 1}, cmap)
    writer = StoreWriter(path)
    if complete:
        writer.write_rows(0, {schema.FRAME_MASK: np.ones((len(ids), 2), bool)})
        writer.mark_complete()
    writer.close()


def test_stitching_refuses_a_missing_or_incomplete_shard_naming_it(tmp_path):
    _tiny_shard(tmp_path / "s0.h5", ["a", "b"], complete=True)
    _tiny_shard(tmp_path / "s1.h5", ["c", "d"], complete=False)
    with pytest.raises(ShardError, match=r"s1\.h5: incomplete \(rows 0 of 2 done\)") as err:
        stitch([tmp_path / "s0.h5", tmp_path / "s1.h5", tmp_path / "s2.h5"], tmp_path / "out.h5", False)
    assert "s2.h5: missing" in str(err.value) and "s0.h5" not in str(err.value)
    assert not (tmp_path / "out.h5").exists()
    with pytest.raises(ShardError, match=r"s0\.h5: aggregates incomplete"):
        stitch([tmp_path / "s0.h5"], tmp_path / "out.h5", aggregates=True)
    assert stitch([tmp_path / "s0.h5"], tmp_path / "out.h5", aggregates=False) == 2


def test_shard_boundaries_depend_on_rows_and_batches_never_on_the_world_size(tmp_path):
    plan = plan_shards(1_100_000, 256)
    assert plan.shard_rows % 256 == 0 and len(plan.bounds) <= 128 and plan.bounds[-1][1] == 1_100_000
    assert all(s % 256 == 0 for s, _ in plan.bounds)
    assert plan_shards(10, 4).bounds == [(0, 4), (4, 8), (8, 10)]
    for size in (1, 2, 3, 8):                    # each rank a contiguous range; together every shard once
        ranges = [World(rank=r, size=size).share(3) for r in range(size)]
        assert [i for a, b in ranges for i in range(a, b)] == [0, 1, 2]
    load_or_make_plan(tmp_path, "labeled", 10, 4)
    assert load_or_make_plan(tmp_path, "labeled", 10, 2).shard_rows == 4, "the recorded plan is kept"
    with pytest.raises(ShardError, match="planned for 10 videos, the annotations now list 12"):
        load_or_make_plan(tmp_path, "labeled", 12, 4)

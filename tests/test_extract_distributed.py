"""extract under torchrun (gloo, CPU): shards per rank, stitched into the store one process would write."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from features import schema
from features.categories import load_category_map
from features.shards import ShardError, load_or_make_plan, plan_shards, stitch
from features.store import StoreDims, StoreWriter, create_store
from features.world import World
from tests.media import write_annotations, write_feature_zip

REPO = Path(__file__).resolve().parents[1]
MAP_CSV = "category_id,level1_id,level1_name,level2_name\n0000,00,a,a0\n0001,00,a,a1\n0100,01,b,b0\n"
CATS = ["0000", "0001", "0100"]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
COMMON = ["--frames", "4", "--max-tokens", "16", "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def make_npy_dataset(root, n, split="labeled", seed=0):
    """n videos in the feature-zip layout, 1-6 frames of dim 8, with a missing and a misshapen npy."""
    rng = np.random.default_rng(seed)
    arrays = {f"{split[0]}{i:03d}": rng.normal(size=(1 + i % 6, 8)).astype(np.float16) for i in range(n)}
    ids = list(arrays)
    arrays[ids[3]] = arrays[ids[3]][:, :5]                     # wrong shape: masked and reported
    del arrays[ids[7]]                                          # missing member
    write_feature_zip(root, split, arrays)
    write_annotations(root, split, [{"id": vid, "title": f"title {i}", "asr": "words" if i % 2 else "",
                                     "ocr": [{"time": 1, "text": f"ocr {i}"}], "category_id": CATS[i % 3]}
                                    for i, vid in enumerate(ids)])
    (root / "category_map.csv").write_text(MAP_CSV)
    return root


def extract_argv(root, out, nproc=None, *extra):
    run = [str(REPO / "run.py"), "extract", "--data", str(root), "--out", str(out),
           "--category-map", str(root / "category_map.csv"), *COMMON, *extra]
    if nproc is None:
        return [sys.executable, *run]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *run]


def run_ok(argv):
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


def test_two_ranks_write_the_store_one_process_writes_bit_for_bit(tmp_path):
    root = make_npy_dataset(tmp_path / "data", 20)
    run_ok(extract_argv(root, tmp_path / "one", None, "--no-aggregates"))
    done = run_ok(extract_argv(root, tmp_path / "two", 2, "--no-aggregates"))
    assert_same_store(tmp_path / "two" / "labeled.h5", tmp_path / "one" / "labeled.h5")
    assert_same_reports(tmp_path / "two", tmp_path / "one")
    assert not (tmp_path / "two" / "labeled.shards").exists(), "shards are deleted once stitched"
    assert done.stdout.count("labeled: 20 videos, 2 with media faults") == 1, "only the main rank prints"


AGG_SCRIPT = """
import sys
from features.aggregates import AggregateOptions
from features.extract import ExtractOptions, extract
data, out = sys.argv[1:3]
extract(data, ["labeled", "test"], out, ExtractOptions(
    frames=4, max_tokens=16, batch_size=2, workers=0, device="cpu", category_map=data + "/category_map.csv",
    aggregates=AggregateOptions(pca_dim=4, n_clusters=3, n_gmm=2, nextvlad_groups=2, batch_size=4)))
"""


def test_two_ranks_fit_one_codebook_and_write_the_aggregates_of_one_process(tmp_path):
    """Two splits of 6 shards each (unit lcm(2, 4) = 4 rows); the codebook samples both splits' shards."""
    root = make_npy_dataset(tmp_path / "data", 24)
    make_npy_dataset(root, 22, split="test", seed=1)
    script = tmp_path / "agg.py"
    script.write_text(AGG_SCRIPT)
    run_ok([sys.executable, str(script), str(root), str(tmp_path / "one")])
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(script), str(root), str(tmp_path / "two")])
    for split in ("labeled", "test"):
        assert_same_store(tmp_path / "two" / f"{split}.h5", tmp_path / "one" / f"{split}.h5")
        assert_same_reports(tmp_path / "two", tmp_path / "one", split)
    assert_same_store(tmp_path / "two" / "codebook.h5", tmp_path / "one" / "codebook.h5")
    with h5py.File(tmp_path / "two" / "labeled.h5", "r") as h5:
        assert h5.attrs["aggregates_complete"] and h5["agg/done"][:].all()


def _rank_pids(parent):
    """{RANK: pid} of the worker processes torchrun (pid `parent`) started."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(kv.split("=", 1) for kv in (entry / "environ").read_text().split("\0") if "=" in kv)
                found[int(env["RANK"])] = int(entry.name)
        except (OSError, KeyError, ValueError):
            continue
    return found


def _complete_shards(shards, indices):
    count = 0
    for i in indices:
        try:
            with h5py.File(shards / f"labeled-{i:05d}.h5", "r", locking=False) as h5:
                count += bool(h5.attrs.get("complete", False))
        except (OSError, KeyError):
            pass
    return count


def test_a_rank_killed_mid_run_resumes_with_another_world_size_to_the_same_store(tmp_path):
    """kill -9 rank 1 of two after some of its shards; rerun as one plain process: the same store."""
    root = make_npy_dataset(tmp_path / "data", 48)         # 24 shards of 2 rows: rank 1 has shards 12-23
    run_ok(extract_argv(root, tmp_path / "whole", None, "--no-aggregates"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(extract_argv(root, killed, 2, "--no-aggregates"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _complete_shards(killed / "labeled.shards", range(12, 24)) < 2 and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, "torchrun reports the killed rank"
    left = _complete_shards(killed / "labeled.shards", range(12, 24))
    assert 2 <= left < 12, "rank 1 was not interrupted mid-way"
    assert not (killed / "labeled.h5").exists(), "nothing is stitched from incomplete shards"

    run_ok(extract_argv(root, killed, None, "--no-aggregates"))          # world size 1 finishes the shards
    assert_same_store(killed / "labeled.h5", tmp_path / "whole" / "labeled.h5")
    assert_same_reports(killed, tmp_path / "whole")


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

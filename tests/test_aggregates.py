"""Codebook fit, codebook-initialised pooling, shift similarities, and agg/* written into stores."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from features import aggregates as agg
from features.aggregates import (AggregateOptions, FrameAggregator, first_valid_frame, run_aggregates,
                                 shift_similarity, shift_statistics)
from features.codebook import AggregateError, Codebook, nonfinite_rows
from features.pooling import POOLINGS, PoolingError, pooling_from_codebook
from features.store import StoreError
from tests.fakes import write_fake_store

SMALL = dict(pca_dim=8, n_clusters=4, n_gmm=2, nextvlad_groups=4, sample_size=300, batch_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def _masked_frames(seed=0, b=4, f=9, d=5):
    rng = np.random.default_rng(seed)
    frames = rng.normal(size=(b, f, d)).astype(np.float32)
    mask = rng.random((b, f)) < 0.7
    mask[0] = False                                     # a video with no valid frame
    mask[1] = True
    return frames, mask


# ---------------------------------------------------------------- frame features


def test_shift_similarity_and_statistics_match_numpy():
    frames, mask = _masked_frames()
    sims, pair = shift_similarity(torch.from_numpy(frames), torch.from_numpy(mask))
    stats = shift_statistics(sims, pair, torch.from_numpy(mask)).numpy()
    sims, pair = sims.numpy(), pair.numpy()
    b, f, _ = frames.shape
    for v in range(b):
        for j, s in enumerate(agg.SHIFTS):
            values = []
            for i in range(f):
                ok = i + s < f and mask[v, i] and mask[v, i + s]
                assert pair[v, j, i] == ok
                if ok:
                    x, y = frames[v, i], frames[v, i + s]
                    values.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
                    np.testing.assert_allclose(sims[v, j, i], values[-1], atol=1e-6)
                else:
                    assert sims[v, j, i] == 0
            expect = [np.mean(values), np.std(values), np.min(values), np.max(values)] if values else [0] * 4
            np.testing.assert_allclose(stats[v, 4 * j:4 * j + 4], expect, atol=1e-6)
        assert stats[v, -1] == pytest.approx(mask[v].mean())
    assert np.isfinite(stats).all() and (stats[0] == 0).all()
    assert len(agg.SHIFT_STAT_NAMES) == stats.shape[1]


def test_first_valid_frame_skips_masked_frames():
    frames, mask = _masked_frames()
    mask[2, :3] = [False, False, True]
    got = first_valid_frame(torch.from_numpy(frames), torch.from_numpy(mask)).numpy()
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_array_equal(got[2], frames[2, 2])
    np.testing.assert_array_equal(got[1], frames[1, 0])


# ---------------------------------------------------------------- codebook and its layers


def _clustered_frames(n=600, d=12, k=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4
    return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.fixture(scope="module")
def codebook():
    return Codebook.fit(_clustered_frames(), AggregateOptions(**SMALL))


def test_netvlad_assignment_is_softmax_of_distances_with_the_asked_sharpness(codebook):
    frames = _clustered_frames(seed=1)[:50]
    module = pooling_from_codebook("netvlad", codebook)
    z = module.projection(torch.from_numpy(frames)).detach().numpy().astype(np.float64)   # (S, d)
    np.testing.assert_allclose(z, codebook.project(frames), atol=1e-4)
    logits = z @ module.pool.assign.weight.detach().numpy() + module.pool.assign.bias.detach().numpy()
    d2 = ((z[:, None, :] - codebook.centers[None]) ** 2).sum(-1)                         # (S, K)
    # softmax(x w + b) == softmax(-alpha |x - c|^2): the two differ by a per-frame constant only
    diff = logits + codebook.alpha * d2
    np.testing.assert_allclose(diff - diff[:, :1], 0, atol=1e-2)
    z_fit = codebook.project(_clustered_frames())
    top2 = np.sort(((z_fit[:, None] - codebook.centers[None]) ** 2).sum(-1), 1)[:, :2]
    assert np.mean(codebook.alpha * (top2[:, 1] - top2[:, 0])) == pytest.approx(np.log(100.0), rel=1e-3)


def test_netfv_is_initialised_from_the_gmm(codebook):
    pool = pooling_from_codebook("netfv", codebook).pool
    np.testing.assert_allclose(pool.centers.detach().numpy(), codebook.gmm_means)
    np.testing.assert_allclose((pool.std ** 2 + pool.eps).detach().numpy(), codebook.gmm_vars, rtol=1e-5)


def test_nextvlad_starts_as_groupwise_vlad_with_uniform_attention(codebook):
    """Its batch norm (eval) must reduce to the NetVLAD bias: a = softmax(-alpha |x'_g - c|^2)."""
    frames = _clustered_frames(seed=2)[:24].reshape(3, 8, -1)
    mask = np.ones((3, 8), bool)
    mask[2, 5:] = False
    got = pooling_from_codebook("nextvlad", codebook)(torch.from_numpy(frames), torch.from_numpy(mask))
    o = codebook.options
    g, c, alpha = o["nextvlad_groups"], codebook.nextvlad_centers, codebook.nextvlad_alpha
    expect = []
    for v in range(3):
        groups = (codebook.project(frames[v][mask[v]]) @ codebook.nextvlad_expansion).reshape(-1, g, c.shape[1])
        d2 = ((groups[:, :, None] - c) ** 2).sum(-1)                      # (F, G, K)
        a = np.exp(-alpha * (d2 - d2.min(-1, keepdims=True)))
        a = 0.5 * a / a.sum(-1, keepdims=True)                            # sigmoid(0) attention
        vlad = np.einsum("fgk,fgj->kj", a, groups) - a.sum((0, 1))[:, None] * c
        expect.append((vlad / np.linalg.norm(vlad, axis=1, keepdims=True)).ravel())
    np.testing.assert_allclose(got.detach().numpy(), np.stack(expect), atol=2e-3)


def test_codebook_save_load_round_trip_and_damage(codebook, tmp_path):
    path = tmp_path / "codebook.h5"
    codebook.save(path)
    loaded = Codebook.load(path)
    assert loaded.checksum == codebook.checksum and loaded.options == codebook.options
    with h5py.File(path, "r+") as h5:
        h5["centers"][0, 0] += 1
    with pytest.raises(AggregateError, match="checksum"):
        Codebook.load(path)


def test_every_registered_pooling_is_built_from_the_codebook_as_the_aggregator_uses_it(codebook):
    frames = _clustered_frames(seed=3)[:40].reshape(5, 8, -1)
    mask = np.ones((5, 8), bool)
    mask[1, 3:] = False
    cached = FrameAggregator(codebook, tuple(POOLINGS))(frames.astype(np.float16), mask)
    for name in POOLINGS:
        module = pooling_from_codebook(name, codebook)
        assert not module.training and module.out_dim == cached[name].shape[1]
        with torch.no_grad():
            got = module(torch.from_numpy(frames.astype(np.float16).astype(np.float32)), torch.from_numpy(mask))
        np.testing.assert_allclose(got.numpy(), cached[name].astype(np.float32), atol=2e-3, err_msg=name)
    with pytest.raises(PoolingError, match="vlad2.*netvlad"):
        pooling_from_codebook("vlad2", codebook)


def test_options_are_checked():
    with pytest.raises(ValueError, match="divisible"):
        AggregateOptions(pca_dim=10, nextvlad_groups=3)
    with pytest.raises(ValueError, match="unknown"):
        AggregateOptions(poolings=("netvlad", "vlad2"))


# ---------------------------------------------------------------- generated-data sanity


def _accuracy(features, labels):
    n = len(labels) // 2
    model = LogisticRegression(max_iter=2000).fit(features[:n], labels[:n])
    return model.score(features[n:], labels[n:])


def _aggregate(codebook, frames, mask, poolings=("netvlad", "softdbow")):
    out = FrameAggregator(codebook, poolings)(frames.astype(np.float16), mask)
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_cluster_membership_is_seen_by_vlad_not_by_the_mean_frame():
    """Class 0 draws frames around +-u, class 1 around +-v: both have mean frame 0 in expectation."""
    rng = np.random.default_rng(0)
    n, f, d = 400, 16, 24
    u, v = np.linalg.qr(rng.normal(size=(d, 2)))[0].T * 4
    labels = rng.integers(2, size=n)
    axis = np.where(labels[:, None, None] == 0, u, v)                     # (N, 1, D)
    frames = axis * rng.choice([-1.0, 1.0], size=(n, f, 1)) + rng.normal(size=(n, f, d))
    mask = np.ones((n, f), bool)
    options = AggregateOptions(pca_dim=8, n_clusters=8, n_gmm=2, nextvlad_groups=4, sample_size=3000)
    codebook = Codebook.fit(frames[:200].reshape(-1, d), options)
    out = _aggregate(codebook, frames, mask)
    mean_acc = _accuracy(frames.mean(1), labels)
    assert _accuracy(out["netvlad"], labels) > mean_acc + 0.3
    assert _accuracy(out["softdbow"], labels) > mean_acc + 0.3
    assert mean_acc < 0.7


def test_frame_order_is_seen_by_shift_similarity_not_by_vlad():
    """Class 0 is a smooth random walk, class 1 the same kind of walk with its frames shuffled."""
    rng = np.random.default_rng(1)
    n, f, d = 300, 16, 24
    frames = np.cumsum(rng.normal(size=(n, f, d)) * 0.4, axis=1) + rng.normal(size=(n, 1, d)) * 2
    labels = rng.integers(2, size=n)
    for i in np.flatnonzero(labels):
        frames[i] = frames[i, rng.permutation(f)]
    mask = np.ones((n, f), bool)
    mask[:, 12:] &= rng.random((n, 4)) < 0.5                              # some padding
    codebook = Codebook.fit(frames[:100].reshape(-1, d), AggregateOptions(**SMALL))
    out = _aggregate(codebook, frames, mask)
    assert _accuracy(out["shift_stats"], labels) > 0.95
    assert _accuracy(out["netvlad"], labels) < 0.75


# ---------------------------------------------------------------- run_aggregates on stores


def _stores(cache, zero_rows=(0, 5)):
    write_fake_store(cache / "labeled.h5", n=70, n_frames=8, frame_dim=16)
    write_fake_store(cache / "test.h5", n=30, split="test", labelled=False, seed=1, frame_dim=16)
    with h5py.File(cache / "labeled.h5", "r+") as h5:             # media faults: no valid frame
        for r in zero_rows:
            h5["frame_mask"][r] = False
            h5["frame_emb"][r] = 0


def _agg_content(path):
    with h5py.File(path, "r") as h5:
        return {k: h5["agg"][k][:] for k in h5["agg"]}, dict(h5.attrs)


def test_run_aggregates_writes_every_dataset_finite_with_recorded_widths(tmp_path):
    _stores(tmp_path)
    report = run_aggregates(tmp_path, ["labeled", "test"], AggregateOptions(**SMALL))
    content, attrs = _agg_content(tmp_path / "labeled.h5")
    widths = report["labeled"]["widths"]
    assert widths == {"first_frame": 16, "netvlad": 32, "netrvlad": 32, "softdbow": 4, "netfv": 32,
                      "nextvlad": 16, "shift_sim": 24, "shift_stats": 13}
    for name in ("first_frame", "netvlad", "netrvlad", "softdbow", "netfv", "nextvlad", "shift_stats"):
        assert content[name].shape == (70, widths[name]) and content[name].dtype == np.float16
    assert content["shift_sim"].shape == content["shift_mask"].shape == (70, 3, 8)
    assert content["done"].all() and attrs["aggregates_complete"]
    for name, values in content.items():
        if name == "done":
            continue
        assert np.isfinite(values.astype(np.float32)).all(), name
        assert not values[[0, 5]].any(), name                    # zero-valid rows: zeros, not NaN
        assert values[1].any(), name
    assert attrs["agg_total_width"] == sum(widths.values())
    assert attrs["agg_pooled_width"] == 32 + 32 + 4 + 32 + 16
    codebook = Codebook.load(tmp_path / "codebook.h5")
    assert attrs["agg_codebook_checksum"] == codebook.checksum
    assert _agg_content(tmp_path / "test.h5")[1]["agg_codebook_checksum"] == codebook.checksum


def test_codebook_is_reused_for_a_later_split_and_never_silently_refit(tmp_path, monkeypatch):
    _stores(tmp_path)
    run_aggregates(tmp_path, ["labeled"], AggregateOptions(**SMALL))
    before = (tmp_path / "codebook.h5").read_bytes()

    def refit(*args):
        raise AssertionError("the codebook was refit")
    monkeypatch.setattr(agg, "fit_codebook", refit)
    run_aggregates(tmp_path, ["test"], AggregateOptions(**SMALL))
    assert (tmp_path / "codebook.h5").read_bytes() == before
    checksums = {_agg_content(tmp_path / f"{s}.h5")[1]["agg_codebook_checksum"] for s in ("labeled", "test")}
    assert len(checksums) == 1
    with pytest.raises(AggregateError, match=r"codebook\.h5.*n_clusters: 4 -> 6.*overwrite"):
        run_aggregates(tmp_path, ["test"], AggregateOptions(**{**SMALL, "n_clusters": 6}))
    assert (tmp_path / "codebook.h5").read_bytes() == before


def test_an_explicit_codebook_path_is_never_fitted_even_when_missing_or_other(tmp_path, monkeypatch):
    _stores(tmp_path)
    elsewhere = tmp_path / "kept" / "codebook.h5"

    def refit(*args):
        raise AssertionError("a codebook given by path was fitted")
    monkeypatch.setattr(agg, "fit_codebook", refit)
    with pytest.raises(AggregateError, match=r"kept/codebook\.h5: no codebook here.*never fitted"):
        run_aggregates(tmp_path, ["test"], AggregateOptions(**SMALL), codebook_path=elsewhere)
    assert not elsewhere.exists() and not (tmp_path / "codebook.h5").exists()
    monkeypatch.undo()
    run_aggregates(tmp_path, ["labeled"], AggregateOptions(**SMALL))                 # the cache's own: fitted
    monkeypatch.setattr(agg, "fit_codebook", refit)
    with pytest.raises(AggregateError, match=r"codebook\.h5.*n_clusters: 4 -> 6.*never refitted"):
        run_aggregates(tmp_path, ["test"], AggregateOptions(**{**SMALL, "n_clusters": 6}), overwrite=True,
                       codebook_path=tmp_path / "codebook.h5")
    run_aggregates(tmp_path, ["test"], AggregateOptions(**SMALL), codebook_path=tmp_path / "codebook.h5")
    assert _agg_content(tmp_path / "test.h5")[1]["aggregates_complete"]


def test_overwrite_refits_and_recomputes(tmp_path):
    _stores(tmp_path)
    run_aggregates(tmp_path, ["labeled"], AggregateOptions(**SMALL))
    new = AggregateOptions(**{**SMALL, "n_clusters": 6})
    run_aggregates(tmp_path, ["labeled"], new, overwrite=True)
    content, attrs = _agg_content(tmp_path / "labeled.h5")
    assert content["netvlad"].shape == (70, 6 * 8) and attrs["aggregates_complete"]
    assert attrs["agg_codebook_checksum"] == Codebook.load(tmp_path / "codebook.h5").checksum
    with pytest.raises(AggregateError, match=r"labeled\.h5.*poolings"):      # same codebook, other store options
        run_aggregates(tmp_path, ["labeled"], AggregateOptions(**{**SMALL, "n_clusters": 6,
                                                                   "poolings": ("netvlad",)}))


def test_resume_after_an_interruption_gives_identical_content(tmp_path):
    clean, broken = tmp_path / "clean", tmp_path / "broken"
    for cache in (clean, broken):
        _stores(cache)
    run_aggregates(clean, ["labeled"], AggregateOptions(**SMALL))
    calls = []

    def crash(path, start, end):
        calls.append(start)
        if len(calls) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_aggregates(broken, ["labeled"], AggregateOptions(**SMALL), on_batch=crash)
    content, attrs = _agg_content(broken / "labeled.h5")
    assert not attrs["aggregates_complete"] and content["done"].sum() == 32
    # a resumed run with another batch size keeps the first run's boundaries
    report = run_aggregates(broken, ["labeled"], AggregateOptions(**{**SMALL, "batch_size": 50}))
    assert report["labeled"]["batches_written"] == 3           # rows 32..70 in batches of 16
    got, attrs = _agg_content(broken / "labeled.h5")
    want, _ = _agg_content(clean / "labeled.h5")
    assert attrs["aggregates_complete"]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


KILLABLE = """
import sys, time
from features.aggregates import AggregateOptions, run_aggregates
run_aggregates(sys.argv[1], ["labeled"], AggregateOptions(**{small}), on_batch=lambda *a: time.sleep(0.3))
"""


def _agg_done_rows(path):
    try:
        with h5py.File(path, "r", locking=False) as h5:
            return int(h5["agg/done"][:].sum())
    except (OSError, KeyError):
        return 0


def test_a_kill_9_during_the_aggregates_stage_resumes_to_the_same_content(tmp_path):
    """SIGKILL a real process writing agg/* mid-way; the rerun equals an uninterrupted run."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    for cache in (clean, killed):
        _stores(cache)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE.format(small=SMALL), str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _agg_done_rows(killed / "labeled.h5") < 32 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 32 <= _agg_done_rows(killed / "labeled.h5") < 70, "the run was not interrupted mid-way"
    assert not _agg_content(killed / "labeled.h5")[1]["aggregates_complete"]
    run_aggregates(killed, ["labeled"], AggregateOptions(**SMALL))
    run_aggregates(clean, ["labeled"], AggregateOptions(**SMALL))
    got, attrs = _agg_content(killed / "labeled.h5")
    want, _ = _agg_content(clean / "labeled.h5")
    assert attrs["aggregates_complete"] and set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_bad_stores_are_refused_with_their_names(tmp_path):
    _stores(tmp_path)
    with pytest.raises(StoreError, match="unlabeled.h5"):
        run_aggregates(tmp_path, ["unlabeled"], AggregateOptions(**SMALL))
    with h5py.File(tmp_path / "labeled.h5", "r+") as h5:
        h5["frame_emb"][3, 0, 0] = np.nan
    with pytest.raises(AggregateError, match="labeled00003.*frame_emb"):
        run_aggregates(tmp_path, ["labeled"], AggregateOptions(**SMALL))


def test_float16_nonfinite_check_agrees_with_numpy():
    rng = np.random.default_rng(0)
    frames = rng.normal(size=(40, 3, 5)).astype(np.float16)
    frames[1, 0, 0], frames[2, 2, 4], frames[3, 1, 1], frames[4, 0, 3] = np.inf, -np.inf, np.nan, 65504
    np.testing.assert_array_equal(nonfinite_rows(frames), ~np.isfinite(frames).all(axis=(1, 2)))
    assert nonfinite_rows(frames)[[1, 2, 3]].all() and not nonfinite_rows(frames)[[0, 4]].any()


def test_one_frame_per_video_gives_zero_shift_features_and_per_frame_pooling(tmp_path):
    """The fashion data has one frame per video: no frame pair exists, pooling sees one frame."""
    write_fake_store(tmp_path / "labeled.h5", n=40, n_frames=1, frame_dim=16)
    run_aggregates(tmp_path, ["labeled"], AggregateOptions(**SMALL))
    content, attrs = _agg_content(tmp_path / "labeled.h5")
    assert attrs["aggregates_complete"] and content["shift_sim"].shape == (40, 3, 1)
    assert not content["shift_mask"].any() and not content["shift_sim"].any()
    np.testing.assert_array_equal(content["shift_stats"][:, -1], 1)         # valid fraction
    assert not content["shift_stats"][:, :-1].any()
    with h5py.File(tmp_path / "labeled.h5", "r") as h5:
        np.testing.assert_array_equal(content["first_frame"], h5["frame_emb"][:, 0])
    assert np.isfinite(content["netvlad"].astype(np.float32)).all()
    norms = np.linalg.norm(content["netvlad"].astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=1e-2)

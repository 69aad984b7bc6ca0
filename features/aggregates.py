"""Engineered video features cached beside the frame embeddings: pooled frames and frame-shift similarity.

`run_aggregates` fits (once) an unsupervised codebook on a sample of frames from all given splits and
writes, into each split's store, per video:
    agg/first_frame  (N, D)        first valid frame embedding (zeros when the video has none)
    agg/<pooling>    (N, width)    frozen NetVLAD / NetRVLAD / SoftDBoW / NetFV / NeXtVLAD of the
                                   PCA-reduced frames (features/pooling.py), initialised from the codebook
    agg/shift_sim    (N, 3, F)     cosine(frame i, frame i+s) for s = 1, 2, 3, zero where not both valid
    agg/shift_mask   (N, 3, F)     bool, True where that pair had two valid frames
    agg/shift_stats  (N, S)        mean, std, min, max per shift, then the fraction of valid frames
    agg/done         (N,)          bool resume marker, written after the row's data
Default widths (d = 64, K = 16, GMM 8, NeXtVLAD lambda 2, G 8): netvlad 1024, netrvlad 1024,
softdbow 16, netfv 1024, nextvlad 256 = 3344 pooled float16 values per video (6.7 KB), plus D + 3 F + 13
for first frame and shift features. The widths are recorded in each store's attrs (agg_widths).

The codebook (CACHE_DIR/codebook.h5) and how it is fitted: features/codebook.py; how each layer is
initialised from it: the `from_codebook` classmethods in features/pooling.py.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import torch
from tqdm import tqdm

from core import schema
from core.device import resolve_device
from core.hdf5 import create_dataset
from core.records import options_diff
from features.codebook import CODEBOOK_FILE, AggregateError, Codebook, check_finite_frames, fit_codebook
from features.pooling import POOLINGS, pca_projection
from features.store import StoreReader

SHIFTS = (1, 2, 3)
SHIFT_STAT_NAMES = [f"shift{s}_{stat}" for s in SHIFTS for stat in ("mean", "std", "min", "max")] \
    + ["valid_fraction"]
AGG_DONE = f"{schema.AGG_GROUP}/done"


class AggregateOptionsError(ValueError):
    """Aggregate options that cannot work together (unknown pooling, indivisible NeXtVLAD groups)."""


@dataclass
class AggregateOptions:
    poolings: tuple = tuple(POOLINGS)  # pooling layers cached under agg/: every one of features/pooling.py
    pca_dim: int = 64              # d: frames are PCA-reduced from D to d before pooling
    n_clusters: int = 16           # K: k-means clusters of NetVLAD, NetRVLAD, SoftDBoW and NeXtVLAD
    n_gmm: int = 8                 # diagonal-GMM components of NetFV (its width is 2 * n_gmm * pca_dim)
    nextvlad_expansion: int = 2    # lambda: NeXtVLAD expands d to lambda * d
    nextvlad_groups: int = 8       # G: NeXtVLAD groups (its width is n_clusters * lambda * pca_dim / G)
    assign_ratio: float = 100.0    # soft-assignment sharpness: nearest / second-nearest centre weight
    sample_size: int = 50000       # frames sampled across all splits to fit PCA, k-means and the GMM
    frames_per_video: int = 4      # at most this many frames from one sampled video, for diversity
    seed: int = 0                  # seeds the frame sample, PCA, k-means, GMM and NeXtVLAD's rotations
    batch_size: int = 256          # videos per read/compute/write batch (a resumed run keeps the first)

    def __post_init__(self):
        self.poolings = tuple(self.poolings)
        unknown = [p for p in self.poolings if p not in POOLINGS]
        if unknown:
            raise AggregateOptionsError(f"aggregate poolings: unknown {unknown}; choose from {sorted(POOLINGS)}")
        for name in ("pca_dim", "n_clusters", "n_gmm", "nextvlad_expansion", "nextvlad_groups",
                     "sample_size", "frames_per_video", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise AggregateOptionsError(f"aggregate option {name} must be >= 1, got {getattr(self, name)}")
        if (self.nextvlad_expansion * self.pca_dim) % self.nextvlad_groups:
            raise AggregateOptionsError(f"aggregate options: nextvlad_expansion * pca_dim = "
                             f"{self.nextvlad_expansion * self.pca_dim} must be divisible by "
                             f"nextvlad_groups = {self.nextvlad_groups}")
        if self.assign_ratio <= 1:
            raise AggregateOptionsError(f"aggregate option assign_ratio must be > 1, got {self.assign_ratio}")

    def codebook_options(self):
        """The options that determine the codebook (a change means a different codebook)."""
        return {k: v for k, v in asdict(self).items() if k not in ("poolings", "batch_size")}

    def store_options(self):
        """The options that determine a store's agg/* content."""
        return {k: (list(v) if k == "poolings" else v) for k, v in asdict(self).items() if k != "batch_size"}


# ---------------------------------------------------------------- frame features without a codebook


def first_valid_frame(frames, mask):
    """(B, F, D), (B, F) -> (B, D): the first frame with mask True, zeros when there is none."""
    first = mask.to(torch.int8).argmax(1)                                 # (B,) 0 when none valid
    picked = frames[torch.arange(len(frames), device=frames.device), first]
    return picked * mask.any(1, keepdim=True).to(frames.dtype)


def shift_similarity(frames, mask):
    """cos(frame i, frame i + s) for s in SHIFTS -> sims (B, 3, F), pair_mask (B, 3, F), zero-padded."""
    frames = frames.float()
    gram = torch.bmm(frames, frames.transpose(1, 2))                      # (B, F, F): one BLAS call
    norm = gram.diagonal(dim1=1, dim2=2).clamp_min(1e-24).sqrt()          # (B, F)
    n = frames.shape[1]
    sims = frames.new_zeros(len(frames), len(SHIFTS), n)
    pair_mask = torch.zeros_like(sims, dtype=torch.bool)
    for j, s in enumerate(SHIFTS):
        if s >= n:
            continue
        pair_mask[:, j, :n - s] = mask[:, :-s] & mask[:, s:]
        sims[:, j, :n - s] = gram.diagonal(s, dim1=1, dim2=2) / (norm[:, :-s] * norm[:, s:])
    return sims * pair_mask, pair_mask


def shift_statistics(sims, pair_mask, mask):
    """(B, 3, F), (B, 3, F), (B, F) -> (B, S) in SHIFT_STAT_NAMES order; zeros where no pair is valid."""
    count = pair_mask.sum(-1).clamp_min(1)                                # (B, 3)
    mean = sims.sum(-1) / count
    std = (((sims - mean[..., None]) ** 2) * pair_mask).sum(-1).div(count).sqrt()
    has = pair_mask.any(-1)
    low = torch.where(pair_mask, sims, torch.inf).amin(-1).where(has, 0)
    high = torch.where(pair_mask, sims, -torch.inf).amax(-1).where(has, 0)
    per_shift = torch.stack([mean, std, low, high], -1).flatten(1)        # (B, 3 * 4)
    return torch.cat([per_shift, mask.float().mean(1, keepdim=True)], 1)


class FrameAggregator:
    """Every agg/* value of a batch of videos, on one device, with frozen codebook-initialised layers.

    Frames travel to the device as float16 and are pooled in float32, on a GPU too: the layers are a few
    small matmuls per video (about 6 MFLOP), which a GPU does far faster than the store is read, so
    half-precision autocast would buy no wall time there, only rounding before the float16 output.
    """

    def __init__(self, codebook, poolings, device="cpu"):
        self.device = torch.device(resolve_device(device))
        self.projection = pca_projection(codebook).to(self.device).eval()
        self.pools = {name: POOLINGS[name].from_codebook(codebook).to(self.device).eval() for name in poolings}

    def widths(self, n_frames, frame_dim):
        widths = {"first_frame": frame_dim, **{n: p.out_dim for n, p in self.pools.items()},
                  "shift_sim": len(SHIFTS) * n_frames, "shift_stats": len(SHIFT_STAT_NAMES)}
        return widths

    @torch.no_grad()
    def __call__(self, frame_emb, frame_mask):
        """frame_emb (B, F, D) float16, frame_mask (B, F) bool -> {agg name: numpy array}."""
        frames = torch.from_numpy(frame_emb).to(self.device).float()         # (B, F, D)
        mask = torch.from_numpy(frame_mask).to(self.device)                  # (B, F)
        reduced = self.projection(frames)                                     # (B, F, d)
        sims, pair_mask = shift_similarity(frames, mask)
        out = {"first_frame": first_valid_frame(frames, mask)}
        out.update({name: pool(reduced, mask) for name, pool in self.pools.items()})
        out.update(shift_sim=sims, shift_stats=shift_statistics(sims, pair_mask, mask))
        out = {k: v.to(torch.float16).cpu().numpy() for k, v in out.items()}
        out["shift_mask"] = pair_mask.cpu().numpy()
        return out


# ---------------------------------------------------------------- writing agg/* into the stores


def _agg_layout(n, n_frames, widths):
    """(dataset name, shape, dtype) of every agg/* dataset; done last."""
    g = schema.AGG_GROUP
    layout = [(f"{g}/{name}", (n, w), "f2") for name, w in widths.items()
              if name not in ("shift_sim",)]
    layout += [(f"{g}/shift_sim", (n, len(SHIFTS), n_frames), "f2"),
               (f"{g}/shift_mask", (n, len(SHIFTS), n_frames), "bool"),
               (AGG_DONE, (n,), "bool")]
    return layout


def _prepare_agg_group(h5, path, codebook, options, widths, overwrite):
    """Reuse agg/* made with this codebook and these options, or (re)create it; returns the batch size."""
    if schema.AGG_GROUP in h5:
        old_sum, old_opts = h5.attrs.get("agg_codebook_checksum"), h5.attrs.get("agg_options")
        new_opts = options.store_options()
        if old_sum is None:                       # creation was interrupted before any row was written
            del h5[schema.AGG_GROUP]
        elif old_sum == codebook.checksum and json.loads(old_opts) == new_opts:
            return int(h5.attrs["agg_batch_size"])
        elif overwrite:
            del h5[schema.AGG_GROUP]
        else:
            what = options_diff(json.loads(old_opts), new_opts) or \
                f"codebook {old_sum[:12]} -> {codebook.checksum[:12]}"
            raise AggregateError(f"{path}: agg/* was computed with other aggregate options or another "
                                 f"codebook ({what}); pass overwrite=True (--overwrite) to recompute it")
    h5.attrs["aggregates_complete"] = False
    if "agg_codebook_checksum" in h5.attrs:
        del h5.attrs["agg_codebook_checksum"]
    n, n_frames = h5[schema.FRAME_MASK].shape
    for name, shape, dtype in _agg_layout(n, n_frames, widths):
        create_dataset(h5, name, shape, dtype)
    h5[AGG_DONE][:] = False                       # fill_time never: the flags must start False
    h5.attrs["agg_options"] = json.dumps(options.store_options(), sort_keys=True)
    h5.attrs["agg_widths"] = json.dumps(widths)
    h5.attrs["agg_pooled_width"] = sum(widths[p] for p in options.poolings)
    h5.attrs["agg_total_width"] = sum(widths.values())
    h5.attrs["agg_shift_stat_names"] = json.dumps(SHIFT_STAT_NAMES)
    h5.attrs["agg_batch_size"] = options.batch_size
    h5.flush()
    h5.attrs["agg_codebook_checksum"] = codebook.checksum     # last: marks the layout as made
    h5.flush()
    return options.batch_size


def write_store_aggregates(path, aggregator, codebook, options, overwrite=False, on_batch=None):
    """Write agg/* into one store in fixed row batches, skipping batches already done."""
    with h5py.File(path, "r+") as h5:
        n, n_frames, frame_dim = h5[schema.FRAME_EMB].shape
        widths = aggregator.widths(n_frames, frame_dim)
        batch = _prepare_agg_group(h5, path, codebook, options, widths, overwrite)
        done = h5[AGG_DONE][:]                                           # (N,) bool
        starts = [s for s in range(0, n, batch) if not done[s:s + batch].all()]
        for start in tqdm(starts, desc=f"aggregates {Path(path).stem}", unit="batch"):
            end = min(n, start + batch)
            frames = h5[schema.FRAME_EMB][start:end]                     # (b, F, D) float16
            mask = h5[schema.FRAME_MASK][start:end]                      # (b, F) bool
            check_finite_frames(path, h5, start, frames)
            for name, values in aggregator(frames, mask).items():
                h5[f"{schema.AGG_GROUP}/{name}"][start:end] = values
            h5.flush()
            h5[AGG_DONE][start:end] = True                               # after the data: resume marker
            h5.flush()
            if on_batch is not None:
                on_batch(path, start, end)
        h5.attrs["aggregates_complete"] = True
        h5.flush()
        return {"rows": n, "batches_written": len(starts), "widths": widths,
                "total_width": int(sum(widths.values()))}


def _codebook_for(paths, options, codebook_path, frame_dim, overwrite, fit_if_absent):
    """Load the codebook at `codebook_path` if it fits these options and frames.

    Only the cache's own default codebook is ever fitted (when absent, or refitted under `overwrite`);
    a codebook named explicitly is used as it is or refused, since a refit would not be the one asked for."""
    if not codebook_path.exists() and not fit_if_absent:
        raise AggregateError(f"{codebook_path}: no codebook here; a codebook given by path is used as it is, "
                             "never fitted: give the path of the one `extract` wrote (CACHE_DIR/codebook.h5)")
    if codebook_path.exists():
        codebook = Codebook.load(codebook_path)
        wanted = options.codebook_options()
        if codebook.options == wanted and codebook.frame_dim == frame_dim:
            return codebook
        diff = options_diff(codebook.options, wanted) or f"frame dim {codebook.frame_dim} -> {frame_dim}"
        if not fit_if_absent:
            raise AggregateError(f"{codebook_path}: the codebook was fitted with other options or frames "
                                 f"({diff}); a codebook given by path is never refitted")
        if not overwrite:
            raise AggregateError(f"{codebook_path}: the codebook was fitted with other options or frames "
                                 f"({diff}); pass overwrite=True (--overwrite) to refit it and recompute "
                                 "every store's aggregates, or use another cache directory")
    codebook = fit_codebook(paths, options)
    codebook.save(codebook_path)
    return codebook


def run_aggregates(cache_dir, splits, options=None, device="cpu", overwrite=False, *,
                   codebook_path=None, on_batch=None):
    """Fit (or reuse) CACHE_DIR/codebook.h5 over all `splits`, then write agg/* into each store.

    Resumable: rerunning skips row batches whose agg/done flags are set; batch boundaries come from
    the batch size stored at the first run, so a resumed store has the same content as an unbroken run.
    `device`: "cpu", "cuda" or "auto". `codebook_path` lets a new split reuse a codebook kept elsewhere:
    it must exist and fit the options (it is never fitted); only CACHE_DIR/codebook.h5 is fitted when absent.
    `on_batch(path, start, end)` is called after each batch is written. Returns {split: report}.
    """
    options = options or AggregateOptions()
    if not splits:
        raise ValueError("run_aggregates: no splits given")
    paths = [schema.store_path(cache_dir, s) for s in splits]
    codebook = store_codebook(cache_dir, paths, options, overwrite, codebook_path)
    aggregator = FrameAggregator(codebook, options.poolings, device)
    return {split: write_store_aggregates(path, aggregator, codebook, options, overwrite, on_batch)
            for split, path in zip(splits, paths)}


def store_codebook(cache_dir, paths, options, overwrite=False, codebook_path=None):
    """The codebook for the complete stores at `paths` (in split and row order): CACHE_DIR/codebook.h5
    loaded, or fitted on their frames when absent; a `codebook_path` is only ever loaded and checked.
    Shards of a split, in order, sample the same frames as their stitched store (the sample follows the
    global row order), so the codebook does not depend on how many ranks extracted them."""
    frame_dims = {}
    for path in paths:
        reader = StoreReader(path)                 # refuses a missing or incomplete store
        reader.require(schema.FRAME_EMB)
        reader.require(schema.FRAME_MASK)
        frame_dims[path] = reader.h5[schema.FRAME_EMB].shape[2]
        reader.close()
    if len(set(frame_dims.values())) > 1:
        raise AggregateError(f"stores have different frame dims: {frame_dims}")
    own = codebook_path is None
    codebook_path = Path(cache_dir) / CODEBOOK_FILE if own else Path(codebook_path)
    return _codebook_for(paths, options, codebook_path, frame_dims[paths[0]], overwrite, fit_if_absent=own)

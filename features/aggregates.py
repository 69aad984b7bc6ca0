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

The codebook (CACHE_DIR/codebook.h5): PCA D -> d, a k-means codebook (K, d) for the VLAD family, a
diagonal GMM for NetFV, and NeXtVLAD's expansion and group codebook. Soft-assignment weights follow the
NetVLAD paper: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2, i.e. softmax_k(-alpha |x - c_k|^2); alpha is set
from the sample so that the nearest centre weighs `assign_ratio` times the second nearest on average.
How NeXtVLAD is initialised without labels: see features/pooling.py NeXtVLAD.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from features import schema
from features.device import resolve_device
from features.pooling import POOLINGS
from features.store import StoreError, StoreReader, create_dataset

CODEBOOK_FILE = "codebook.h5"
SHIFTS = (1, 2, 3)
SHIFT_STAT_NAMES = [f"shift{s}_{stat}" for s in SHIFTS for stat in ("mean", "std", "min", "max")] \
    + ["valid_fraction"]
AGG_DONE = f"{schema.AGG_GROUP}/done"


class AggregateError(StoreError):
    """A codebook or a store's aggregates that do not match what was asked."""


@dataclass
class AggregateOptions:
    poolings: tuple = ("netvlad", "netrvlad", "softdbow", "netfv", "nextvlad")  # pooling layers cached under agg/
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
            raise ValueError(f"aggregate poolings: unknown {unknown}; choose from {sorted(POOLINGS)}")
        for name in ("pca_dim", "n_clusters", "n_gmm", "nextvlad_expansion", "nextvlad_groups",
                     "sample_size", "frames_per_video", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"aggregate option {name} must be >= 1, got {getattr(self, name)}")
        if (self.nextvlad_expansion * self.pca_dim) % self.nextvlad_groups:
            raise ValueError(f"aggregate options: nextvlad_expansion * pca_dim = "
                             f"{self.nextvlad_expansion * self.pca_dim} must be divisible by "
                             f"nextvlad_groups = {self.nextvlad_groups}")
        if self.assign_ratio <= 1:
            raise ValueError(f"aggregate option assign_ratio must be > 1, got {self.assign_ratio}")

    def codebook_options(self):
        """The options that determine the codebook (a change means a different codebook)."""
        return {k: v for k, v in asdict(self).items() if k not in ("poolings", "batch_size")}

    def store_options(self):
        """The options that determine a store's agg/* content."""
        return {k: (list(v) if k == "poolings" else v) for k, v in asdict(self).items() if k != "batch_size"}


def _options_diff(old, new):
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


# ---------------------------------------------------------------- codebook


@dataclass
class Codebook:
    """What the unsupervised fit learned; arrays float32. Fit with `Codebook.fit` or `fit_codebook`."""
    options: dict                  # AggregateOptions.codebook_options() it was fitted with
    frame_dim: int                 # D
    n_sample: int                  # frames it was fitted on
    pca_mean: np.ndarray           # (D,)
    pca_components: np.ndarray     # (d, D)
    centers: np.ndarray            # (K, d) k-means codebook of the VLAD family
    alpha: float                   # soft-assignment sharpness for `centers`
    gmm_means: np.ndarray          # (Kg, d) NetFV
    gmm_vars: np.ndarray           # (Kg, d)
    gmm_alpha: float
    nextvlad_expansion: np.ndarray  # (d, lam d) [I | Q_1 .. Q_lam-1]
    nextvlad_centers: np.ndarray   # (K, lam d / G) k-means codebook of group sub-vectors
    nextvlad_alpha: float
    nextvlad_logit_mean: np.ndarray  # (G K,) assignment logits' mean on the sample (BN running stats)
    nextvlad_logit_var: np.ndarray   # (G K,)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                setattr(self, f.name, np.ascontiguousarray(value, np.float32))

    @classmethod
    def fit(cls, frames, options):
        """frames (S, D) float: sampled valid frame embeddings."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        frames = np.asarray(frames, np.float32)
        o = options
        if len(frames) < max(o.pca_dim, o.n_clusters, o.n_gmm) or frames.shape[1] < o.pca_dim:
            raise AggregateError(f"codebook: {len(frames)} sampled frames of dim {frames.shape[1]} cannot fit "
                                 f"pca_dim={o.pca_dim}, n_clusters={o.n_clusters}, n_gmm={o.n_gmm}")
        pca = PCA(o.pca_dim, svd_solver="full").fit(frames)
        z = pca.transform(frames).astype(np.float32)                  # (S, d)
        centers = _kmeans(z, o.n_clusters, o.seed)
        gmm = GaussianMixture(o.n_gmm, covariance_type="diag", reg_covar=1e-4, max_iter=200,
                              random_state=o.seed).fit(z)
        expansion = _expansion_matrix(o.pca_dim, o.nextvlad_expansion, o.seed)
        group_dim = o.nextvlad_expansion * o.pca_dim // o.nextvlad_groups
        groups = (z @ expansion).reshape(len(z), o.nextvlad_groups, group_dim)   # (S, G, lam d / G)
        flat = groups.reshape(-1, group_dim)
        flat = flat[np.random.default_rng(o.seed).permutation(len(flat))[:200_000]]
        nx_centers = _kmeans(flat, o.n_clusters, o.seed)
        nx_alpha = _alpha(flat, nx_centers, o.assign_ratio)
        w, b = _netvlad_init(nx_centers, nx_alpha)                    # (lam d / G, K), (K,)
        logits = (groups @ w).reshape(len(z), -1)                     # (S, G K) before the bias
        return cls(options=o.codebook_options(), frame_dim=frames.shape[1], n_sample=len(frames),
                   pca_mean=pca.mean_, pca_components=pca.components_, centers=centers,
                   alpha=_alpha(z, centers, o.assign_ratio), gmm_means=gmm.means_,
                   gmm_vars=gmm.covariances_, gmm_alpha=_alpha(z, gmm.means_, o.assign_ratio),
                   nextvlad_expansion=expansion, nextvlad_centers=nx_centers, nextvlad_alpha=nx_alpha,
                   nextvlad_logit_mean=logits.mean(0), nextvlad_logit_var=logits.var(0))

    def project(self, frames):
        """(..., D) -> (..., d) PCA projection."""
        return (np.asarray(frames, np.float32) - self.pca_mean) @ self.pca_components.T

    @property
    def checksum(self):
        h = hashlib.sha256()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                h.update(f.name.encode() + value.tobytes())
            else:
                h.update(f.name.encode() + json.dumps(value, sort_keys=True).encode())
        return h.hexdigest()

    def save(self, path):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as h5:
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, np.ndarray):
                    h5.create_dataset(f.name, data=value)
                else:
                    h5.attrs[f.name] = json.dumps(value)
            h5.attrs["checksum"] = self.checksum
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.exists():
            raise AggregateError(f"{path}: no codebook here; run `python run.py extract` first")
        with h5py.File(path, "r") as h5:
            values = {f.name: (h5[f.name][:] if f.name in h5 else json.loads(h5.attrs[f.name]))
                      for f in fields(cls)}
            stored = h5.attrs["checksum"]
        codebook = cls(**values)
        if codebook.checksum != stored:
            raise AggregateError(f"{path}: codebook checksum {codebook.checksum[:12]} differs from the stored "
                                 f"{stored[:12]}; the file is damaged, delete it and rerun extract")
        return codebook


def _kmeans(x, k, seed):
    from sklearn.cluster import MiniBatchKMeans
    return MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096).fit(x).cluster_centers_


def _sq_dist(x, centers):                          # (S, d), (K, d) -> (S, K)
    return (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]


def _alpha(x, centers, ratio):
    """alpha with exp(alpha * (d2_second - d2_nearest)) = ratio on average over the sample."""
    d2 = np.sort(_sq_dist(x.astype(np.float64), centers.astype(np.float64)), axis=1)
    gap = float(np.mean(d2[:, 1] - d2[:, 0]))
    return math.log(ratio) / max(gap, 1e-12)


def _netvlad_init(centers, alpha):
    """w_k = 2 alpha c_k, b_k = -alpha |c_k|^2: softmax_k(x w + b) = softmax_k(-alpha |x - c_k|^2)."""
    return 2 * alpha * centers.T, -alpha * (centers ** 2).sum(1)


def _expansion_matrix(dim, expansion, seed):
    """(d, lam d): the identity then lam - 1 seeded random rotations, so groups see varied directions."""
    rng = np.random.default_rng(seed)
    blocks = [np.eye(dim)] + [np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(expansion - 1)]
    return np.concatenate(blocks, axis=1)


def sample_frames(store_paths, options):
    """(S, D) float32 frames drawn (seeded) from all stores: random videos, <= frames_per_video each."""
    rng = np.random.default_rng(options.seed)
    readers = [StoreReader(p) for p in store_paths]
    candidates = []                                        # (store index, row) of videos with a frame
    for s, reader in enumerate(readers):
        for start in range(0, len(reader), 4096):
            rows = np.flatnonzero(reader.read(schema.FRAME_MASK, slice(start, start + 4096)).any(1))
            candidates.append(np.stack([np.full(len(rows), s), rows + start], 1))
    candidates = np.concatenate(candidates)[rng.permutation(sum(len(c) for c in candidates))]
    sample, total = [], 0
    with tqdm(total=options.sample_size, desc="codebook sample", unit="frame") as bar:
        for block in np.array_split(candidates, max(1, len(candidates) // options.batch_size)):
            for s, rows in _rows_by_store(block):
                frames = readers[s].read(schema.FRAME_EMB, rows)                # (b, F, D)
                masks = readers[s].read(schema.FRAME_MASK, rows)                # (b, F)
                _check_frames(readers[s].path, readers[s].h5, rows, frames)
                for frame, mask in zip(frames, masks):
                    valid = np.flatnonzero(mask)
                    pick = rng.choice(valid, min(len(valid), options.frames_per_video), replace=False)
                    sample.append(frame[np.sort(pick)].astype(np.float32))
                    total += len(pick)
                    bar.update(len(pick))
            if total >= options.sample_size:
                break
    for reader in readers:
        reader.close()
    if not sample:
        raise AggregateError(f"{', '.join(map(str, store_paths))}: no valid frame to fit a codebook on")
    return np.concatenate(sample)[:options.sample_size]


def _rows_by_store(block):
    """Sorted rows of each store in a block of (store, row) pairs (h5py reads increasing indices)."""
    for s in np.unique(block[:, 0]):
        yield s, np.sort(block[block[:, 0] == s, 1])


def fit_codebook(store_paths, options):
    """Fit the codebook on a seeded sample of frames from all `store_paths`."""
    return Codebook.fit(sample_frames(store_paths, options), options)


# ---------------------------------------------------------------- pooling layers from the codebook


class CodebookPooling(torch.nn.Module):
    """The codebook's PCA projection (D -> d) followed by one pooling layer: (B, F, D) -> (B, out_dim)."""

    def __init__(self, projection, pool):
        super().__init__()
        self.projection, self.pool, self.out_dim = projection, pool, pool.out_dim

    def forward(self, x, mask):                    # x (B, F, D), mask (B, F)
        return self.pool(self.projection(x), mask)


def _projection(codebook):
    d, dim = codebook.pca_components.shape
    linear = torch.nn.Linear(dim, d)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(codebook.pca_components))                  # (d, D)
        linear.bias.copy_(torch.from_numpy(-codebook.pca_components @ codebook.pca_mean))
    return linear


def _set(param, value):
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(value, np.float32)))


def _init_assign(assign, centers, alpha):
    w, b = _netvlad_init(centers, alpha)
    _set(assign.weight, w)
    _set(assign.bias, b)


def _init_nextvlad(pool, cb, options):
    groups = options["nextvlad_groups"]
    w, b = _netvlad_init(cb.nextvlad_centers, cb.nextvlad_alpha)         # (lam d / G, K), (K,)
    _set(pool.expand.weight, cb.nextvlad_expansion.T)
    _set(pool.expand.bias, np.zeros(pool.expand.bias.shape))
    _set(pool.attention.weight, np.zeros(pool.attention.weight.shape))   # uniform attention
    _set(pool.attention.bias, np.zeros(pool.attention.bias.shape))
    _set(pool.assign.weight, np.kron(np.eye(groups), w))                 # block diagonal (lam d, G K)
    _set(pool.assign.bias, np.zeros(pool.assign.bias.shape))             # unused: BN carries the bias
    bn, std = pool.assign.bn, np.sqrt(cb.nextvlad_logit_var + pool.assign.bn.eps)
    _set(bn.running_mean, cb.nextvlad_logit_mean)
    _set(bn.running_var, cb.nextvlad_logit_var)
    _set(bn.weight, std)                                                 # eval-mode BN(z) = z + b
    _set(bn.bias, cb.nextvlad_logit_mean + np.tile(b, groups))
    _set(pool.centers, cb.nextvlad_centers)


def init_pooling(name, codebook):
    """A pooling layer (with the PCA projection in front) initialised from the codebook, in eval mode."""
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)}")
    o, d = codebook.options, codebook.options["pca_dim"]
    if name == "netfv":
        pool = POOLINGS[name](d, o["n_gmm"])
        _init_assign(pool.assign, codebook.gmm_means, codebook.gmm_alpha)
        _set(pool.centers, codebook.gmm_means)
        _set(pool.std, np.sqrt(np.maximum(codebook.gmm_vars - pool.eps, 0)))  # std^2 + eps = GMM variance
    elif name == "nextvlad":
        pool = POOLINGS[name](d, o["n_clusters"], o["nextvlad_expansion"], o["nextvlad_groups"])
        _init_nextvlad(pool, codebook, o)
    else:
        pool = POOLINGS[name](d, o["n_clusters"])
        _init_assign(pool.assign, codebook.centers, codebook.alpha)
        if name == "netvlad":
            _set(pool.centers, codebook.centers)
    return CodebookPooling(_projection(codebook), pool).eval()


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
        self.projection = _projection(codebook).to(self.device).eval()
        self.pools = {name: init_pooling(name, codebook).pool.to(self.device).eval() for name in poolings}

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
            what = _options_diff(json.loads(old_opts), new_opts) or \
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


def _nonfinite_rows(frames):
    """(b, F, D) -> (b,) bool; for float16 by the exponent bits, 5x faster than np.isfinite."""
    if frames.dtype == np.float16:
        return ((frames.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=(1, 2))
    return ~np.isfinite(frames).all(axis=(1, 2))


def _check_frames(path, h5, rows, frames):
    """Refuse non-finite frame embeddings, naming the video; rows a start index or an index array."""
    bad = _nonfinite_rows(frames)
    if bad.any():
        first = int(np.argmax(bad))
        vid = h5[schema.IDS][rows + first if np.isscalar(rows) else rows[first]]
        vid = vid.decode() if isinstance(vid, bytes) else vid
        raise AggregateError(f"{path}: video {vid}: field {schema.FRAME_EMB} has non-finite values")


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
            _check_frames(path, h5, start, frames)
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


def _codebook_for(paths, options, codebook_path, frame_dim, overwrite):
    """Load the stored codebook if it fits these options and frames; fit and save one when none exists."""
    if codebook_path.exists():
        codebook = Codebook.load(codebook_path)
        wanted = options.codebook_options()
        if codebook.options == wanted and codebook.frame_dim == frame_dim:
            return codebook
        diff = _options_diff(codebook.options, wanted) or f"frame dim {codebook.frame_dim} -> {frame_dim}"
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
    `device`: "cpu", "cuda" or "auto". `codebook_path` lets a new split reuse a codebook kept elsewhere;
    `on_batch(path, start, end)` is called after each batch is written. Returns {split: report}.
    """
    options = options or AggregateOptions()
    if not splits:
        raise ValueError("run_aggregates: no splits given")
    paths = [schema.store_path(cache_dir, s) for s in splits]
    frame_dims = {}
    for path in paths:
        reader = StoreReader(path)                 # refuses a missing or incomplete store
        reader.require(schema.FRAME_EMB)
        reader.require(schema.FRAME_MASK)
        frame_dims[path] = reader.h5[schema.FRAME_EMB].shape[2]
        reader.close()
    if len(set(frame_dims.values())) > 1:
        raise AggregateError(f"stores have different frame dims: {frame_dims}")
    codebook_path = Path(codebook_path) if codebook_path else Path(cache_dir) / CODEBOOK_FILE
    codebook = _codebook_for(paths, options, codebook_path, frame_dims[paths[0]], overwrite)
    aggregator = FrameAggregator(codebook, options.poolings, device)
    return {split: write_store_aggregates(path, aggregator, codebook, options, overwrite, on_batch)
            for split, path in zip(splits, paths)}

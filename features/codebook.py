"""The aggregates' codebook: what an unsupervised fit on sampled frames learns, saved beside the stores.

CACHE_DIR/codebook.h5 holds PCA D -> d, a k-means codebook (K, d) for the VLAD family, a diagonal GMM
for NetFV, and NeXtVLAD's expansion and group codebook. Soft-assignment weights follow the NetVLAD
paper: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2, i.e. softmax_k(-alpha |x - c_k|^2); alpha is set from
the sample so that the nearest centre weighs `assign_ratio` times the second nearest on average.
The pooling layers initialise themselves from it (features/pooling.py `pooling_from_codebook`).

    codebook = fit_codebook(store_paths, options)     # options: features.aggregates.AggregateOptions
    codebook.save(path); Codebook.load(path)          # load refuses a missing or damaged file
"""
import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from core import schema
from core.records import atomic_path
from features.pooling import netvlad_init
from features.store import StoreError, StoreReader

CODEBOOK_FILE = "codebook.h5"


class AggregateError(StoreError):
    """A codebook or a store's aggregates that do not match what was asked."""


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
        """frames (S, D) float: sampled valid frame embeddings; options: an AggregateOptions."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        frames = np.asarray(frames, np.float32)
        o = options
        if len(frames) < max(o.pca_dim, o.n_clusters, o.n_gmm) or frames.shape[1] < o.pca_dim:
            raise AggregateError(f"codebook: {len(frames)} sampled frames of dim {frames.shape[1]} cannot fit "
                                 f"pca_dim={o.pca_dim}, n_clusters={o.n_clusters}, n_gmm={o.n_gmm}")
        pca = PCA(o.pca_dim, svd_solver="full").fit(frames)
        z = pca.transform(frames).astype(np.float32)                  # (S, d)
        centers = kmeans(z, o.n_clusters, o.seed)
        gmm = GaussianMixture(o.n_gmm, covariance_type="diag", reg_covar=1e-4, max_iter=200,
                              random_state=o.seed).fit(z)
        nextvlad = _fit_nextvlad(z, o)
        return cls(options=o.codebook_options(), frame_dim=frames.shape[1], n_sample=len(frames),
                   pca_mean=pca.mean_, pca_components=pca.components_, centers=centers,
                   alpha=assign_alpha(z, centers, o.assign_ratio), gmm_means=gmm.means_,
                   gmm_vars=gmm.covariances_, gmm_alpha=assign_alpha(z, gmm.means_, o.assign_ratio),
                   **nextvlad)

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
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
            for f in fields(self):
                value = getattr(self, f.name)
                if isinstance(value, np.ndarray):
                    h5.create_dataset(f.name, data=value)
                else:
                    h5.attrs[f.name] = json.dumps(value)
            h5.attrs["checksum"] = self.checksum

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


def _fit_nextvlad(z, o):
    """NeXtVLAD's codebook fields from PCA-reduced frames z (S, d): see features/pooling.py NeXtVLAD."""
    expansion = expansion_matrix(o.pca_dim, o.nextvlad_expansion, o.seed)       # (d, lam d)
    group_dim = o.nextvlad_expansion * o.pca_dim // o.nextvlad_groups
    groups = (z @ expansion).reshape(len(z), o.nextvlad_groups, group_dim)    # (S, G, lam d / G)
    flat = groups.reshape(-1, group_dim)
    flat = flat[np.random.default_rng(o.seed).permutation(len(flat))[:200_000]]
    centers = kmeans(flat, o.n_clusters, o.seed)
    alpha = assign_alpha(flat, centers, o.assign_ratio)
    w, _ = netvlad_init(centers, alpha)                                         # (lam d / G, K)
    logits = (groups @ w).reshape(len(z), -1)                                   # (S, G K) before the bias
    return dict(nextvlad_expansion=expansion, nextvlad_centers=centers, nextvlad_alpha=alpha,
                nextvlad_logit_mean=logits.mean(0), nextvlad_logit_var=logits.var(0))


def kmeans(x, k, seed):
    """(S, d) -> (k, d) seeded MiniBatchKMeans centres."""
    from sklearn.cluster import MiniBatchKMeans
    return MiniBatchKMeans(k, random_state=seed, n_init=3, batch_size=4096).fit(x).cluster_centers_


def _sq_dist(x, centers):                          # (S, d), (K, d) -> (S, K)
    return (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]


def assign_alpha(x, centers, ratio):
    """alpha with exp(alpha * (d2_second - d2_nearest)) = ratio on average over the sample x (S, d)."""
    d2 = np.sort(_sq_dist(x.astype(np.float64), centers.astype(np.float64)), axis=1)
    gap = float(np.mean(d2[:, 1] - d2[:, 0]))
    return math.log(ratio) / max(gap, 1e-12)


def expansion_matrix(dim, expansion, seed):
    """(d, lam d): the identity then lam - 1 seeded random rotations, so groups see varied directions."""
    rng = np.random.default_rng(seed)
    blocks = [np.eye(dim)] + [np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(expansion - 1)]
    return np.concatenate(blocks, axis=1)


# ---------------------------------------------------------------- the frame sample


def nonfinite_rows(frames):
    """(b, F, D) -> (b,) bool; for float16 by the exponent bits, 5x faster than np.isfinite."""
    if frames.dtype == np.float16:
        return ((frames.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=(1, 2))
    return ~np.isfinite(frames).all(axis=(1, 2))


def check_finite_frames(path, h5, rows, frames):
    """Refuse non-finite frame embeddings (b, F, D), naming the video; rows a start index or an index array."""
    bad = nonfinite_rows(frames)
    if bad.any():
        first = int(np.argmax(bad))
        vid = h5[schema.IDS][rows + first if np.isscalar(rows) else rows[first]]
        vid = vid.decode() if isinstance(vid, bytes) else vid
        raise AggregateError(f"{path}: video {vid}: field {schema.FRAME_EMB} has non-finite values")


def sample_frames(store_paths, options):
    """(S, D) float32 frames drawn (seeded) from all stores: random videos, <= frames_per_video each."""
    rng = np.random.default_rng(options.seed)
    readers = [StoreReader(p) for p in store_paths]
    try:
        candidates = _videos_with_frames(readers, rng)
        sample = _draw(readers, candidates, options, rng)
    finally:
        for reader in readers:
            reader.close()
    if not sample:
        raise AggregateError(f"{', '.join(map(str, store_paths))}: no valid frame to fit a codebook on")
    return np.concatenate(sample)[:options.sample_size]


def _videos_with_frames(readers, rng):
    """(V, 2) shuffled (store index, row) of every video with a valid frame."""
    candidates = []
    for s, reader in enumerate(readers):
        for start in range(0, len(reader), 4096):
            rows = np.flatnonzero(reader.read(schema.FRAME_MASK, slice(start, start + 4096)).any(1))
            candidates.append(np.stack([np.full(len(rows), s), rows + start], 1))
    return np.concatenate(candidates)[rng.permutation(sum(len(c) for c in candidates))]


def _draw(readers, candidates, options, rng):
    """[(n_i, D) float32] up to frames_per_video valid frames per candidate, until sample_size."""
    sample, total = [], 0
    # the bar counts frames drawn, up to what the videos can give (not --codebook-sample when they hold fewer)
    most = min(options.sample_size, len(candidates) * options.frames_per_video)
    with tqdm(total=most, desc="codebook: frames sampled", unit="frame") as bar:
        for block in np.array_split(candidates, max(1, len(candidates) // options.batch_size)):
            for s, rows in _rows_by_store(block):
                frames = readers[s].read(schema.FRAME_EMB, rows)                # (b, F, D)
                masks = readers[s].read(schema.FRAME_MASK, rows)                # (b, F)
                check_finite_frames(readers[s].path, readers[s].h5, rows, frames)
                for frame, mask in zip(frames, masks):
                    valid = np.flatnonzero(mask)
                    pick = rng.choice(valid, min(len(valid), options.frames_per_video), replace=False)
                    sample.append(frame[np.sort(pick)].astype(np.float32))
                    total += len(pick)
                    bar.update(len(pick))
            if total >= options.sample_size:
                break
        bar.total = bar.n              # ends at 100% also when videos had fewer valid frames than the bound
        bar.refresh()
    return sample


def _rows_by_store(block):
    """Sorted rows of each store in a block of (store, row) pairs (h5py reads increasing indices)."""
    for s in np.unique(block[:, 0]):
        yield s, np.sort(block[block[:, 0] == s, 1])


def fit_codebook(store_paths, options):
    """Fit the codebook on a seeded sample of frames from all `store_paths`."""
    return Codebook.fit(sample_frames(store_paths, options), options)

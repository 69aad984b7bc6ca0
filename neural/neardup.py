"""Near-duplicate groups from the cached frozen features (`train-neural --groups auto`, the default).

Clips cut from one long video, one product shot in several colours, re-uploads: when such items fall on
both sides of a fold, out-of-fold scores measure memory, not new data. This module finds them without a
groups file, from what `extract` cached: each video's masked mean frame and its pooled text (the mean
of the fields it has), each modality centred, PCA'd to at most `dims` and L2-normalised, the two
concatenated (an item's cosine to another is the mean of its modality cosines).

The rule (NearDupRule; every threshold comes from the data):
- r_j(i): the Euclidean distance of item i (unit vectors) to its j-th nearest neighbour.
- Local scale: r_K(i), K = scale_rank, capped at its median over items (an item whose K-th neighbour
  lies across a cluster's edge would otherwise get a lax threshold). Intrinsic dimension d: log(m / K) / log(median_i r_m(i) / r_K(i)),
  m = mid_rank (the neighbour count in a ball grows as radius^d).
- Without duplicates, a locally uniform neighbourhood of dimension d puts an item's nearest neighbour
  within f * r_K(i) with probability about K f^d; f = (chance / K)^(1/d) makes that `chance` (0.5%).
- An edge (i, j): i and j among each other's k nearest neighbours (mutual) and r(i, j) <= f * min(r_K(i),
  r_K(j)) (the capped scales). Groups: edges added shortest first, a union refused when it would
  make a group above `cap`.
- Used (the folds keep the groups) when at least `min_share` of the items are grouped (4x the chance
  rate) and the data has at least `min_items` items; otherwise the folds stay the stratified ones.

Memory: one pass over the store in row blocks keeps the (N, D) mean frames and pooled texts in float16,
then (N, <= 2 * dims) float32; the neighbour search (sklearn, brute force) works in chunks of
`working_memory_mib`.
"""
from dataclasses import asdict, dataclass

import numpy as np
from scipy.cluster.hierarchy import DisjointSet
from sklearn import config_context
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from core import schema

AUTO = "auto"
NONE = "none"


@dataclass(frozen=True)
class NearDupRule:
    k: int = 10                   # an edge joins mutual k nearest neighbours only
    scale_rank: int = 30          # K: an item's local scale is its K-th neighbour's distance
    mid_rank: int = 15            # m: r_m / r_K gives the intrinsic dimension
    chance: float = 0.005         # share of items a chance pair would group in data without duplicates
    cap: int = 20                 # the largest group
    min_share: float = 0.02       # groups are used when at least this share of items is grouped
    min_items: int = 120          # fewer items: no grouping (4 x scale_rank)
    dims: int = 128               # PCA width per modality
    pca_sample: int = 20000       # rows the PCA is fitted on
    block: int = 512              # store rows read at a time
    working_memory_mib: int = 64  # sklearn's chunk of the distance matrix
    seed: int = 0

    def describe(self):
        return (f"mutual {self.k}-nearest neighbours closer than f * (distance to the {self.scale_rank}th "
                f"neighbour), f = ({self.chance} / {self.scale_rank})^(1/d), d the intrinsic dimension "
                f"from r_{self.mid_rank}/r_{self.scale_rank}; groups of at most {self.cap}; used when at "
                f"least {self.min_share:.0%} of the items are grouped")


def store_vectors(reader, rows, rule=NearDupRule()):
    """(N, D') float32 unit vectors of the store rows `rows` (sorted positions): mean frame and pooled
    text, each centred, PCA'd and normalised (a modality no row has is left out); and the modality names."""
    n = len(rows)
    frames, texts = None, None
    for start in range(0, n, rule.block):
        chunk = rows[start:start + rule.block]
        emb = reader.read(schema.FRAME_EMB, chunk).astype(np.float32)             # (B, F, D)
        mask = reader.read(schema.FRAME_MASK, chunk)[..., None]                    # (B, F, 1)
        mean_frame = (emb * mask).sum(1) / np.maximum(mask.sum(1), 1)              # (B, D)
        pooled = reader.read(schema.TEXT_POOLED, chunk).astype(np.float32)        # (B, 3, Dt)
        fields = reader.read(schema.TEXT_FIELD_MASK, chunk)[..., None]             # (B, 3, 1)
        text = (pooled * fields).sum(1) / np.maximum(fields.sum(1), 1)             # (B, Dt)
        if frames is None:
            frames = np.zeros((n, mean_frame.shape[1]), np.float16)
            texts = np.zeros((n, text.shape[1]), np.float16)
            has = np.zeros((n, 2), bool)
        frames[start:start + len(chunk)], texts[start:start + len(chunk)] = mean_frame, text
        has[start:start + len(chunk)] = np.c_[mask.any((1, 2)), fields.any((1, 2))]
    parts, names = [], []
    for name, x, present in (("mean_frame", frames, has[:, 0]), ("text", texts, has[:, 1])):
        if present.any():
            parts.append(modality_vectors(x, present, rule))
            names.append(name)
    z = np.concatenate(parts, axis=1) / np.sqrt(len(parts))                        # (N, <= 2 dims)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), names


def modality_vectors(x, present, rule):
    """x (N, D) float16, present (N,) -> (N, min(D, dims)) float32: centred on the rows that have the
    modality, PCA'd (fitted on a seeded sample of them), unit length; zeros where the modality is absent."""
    rng = np.random.default_rng(rule.seed)
    have = np.flatnonzero(present)
    sample = np.sort(rng.permutation(have)[:rule.pca_sample])
    width = min(x.shape[1], rule.dims, len(sample))
    pca = PCA(width, svd_solver="randomized" if width < x.shape[1] else "full", random_state=rule.seed)
    pca.fit(x[sample].astype(np.float32))
    out = np.zeros((len(x), width), np.float32)
    for start in range(0, len(have), 8192):
        part = have[start:start + 8192]
        v = pca.transform(x[part].astype(np.float32))
        out[part] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


def intrinsic_dimension(dist, rule):
    """d from the median ratio r_m / r_K over items (dist (N, K) ascending); clipped to [1, 64]."""
    ratio = np.median(dist[:, rule.mid_rank - 1] / np.maximum(dist[:, rule.scale_rank - 1], 1e-12))
    ratio = float(np.clip(ratio, 1e-6, 1 - 1e-9))
    return float(np.clip(np.log(rule.mid_rank / rule.scale_rank) / np.log(ratio), 1.0, 64.0))


def mutual_edges(dist, idx, limit, k):
    """(i (E,), j (E,), r (E,)) with i < j: mutual k-nearest neighbours whose distance is within limit[i]
    and limit[j]. dist, idx (N, K) ascending."""
    n = len(idx)
    a = np.repeat(np.arange(n), k)
    b, r = idx[:, :k].ravel(), dist[:, :k].ravel()
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    key = lo.astype(np.int64) * n + hi
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    keep = first[counts == 2]                       # each side names the other
    keep = keep[r[keep] <= np.minimum(limit[lo[keep]], limit[hi[keep]])]
    return lo[keep], hi[keep], r[keep]


def capped_components(n, i, j, r, cap):
    """(N,) int group of each item: edges joined shortest first, a union refused above `cap` items."""
    ds = DisjointSet(range(n))
    order = np.argsort(r, kind="stable")
    for a, b in zip(i[order].tolist(), j[order].tolist()):
        if not ds.connected(a, b) and ds.subset_size(a) + ds.subset_size(b) <= cap:
            ds.merge(a, b)
    root = {}
    return np.array([root.setdefault(ds[a], len(root)) for a in range(n)], np.int64)


def find_groups(z, rule=NearDupRule()):
    """z (N, D) unit vectors -> (group (N,) int, record dict: the rule, its data-chosen values, counts and
    whether the groups are used)."""
    n = len(z)
    record = {"rule": rule.describe(), "params": asdict(rule), "n_items": int(n)}
    if n < rule.min_items:
        return np.arange(n), dict(record, used=False, n_grouped=0, n_groups=0, largest=1,
                                  reason=f"{n} items, fewer than {rule.min_items}: not grouped")
    with config_context(working_memory=rule.working_memory_mib):
        dist, idx = NearestNeighbors(n_neighbors=rule.scale_rank, algorithm="brute").fit(z).kneighbors()
    d = intrinsic_dimension(dist, rule)
    f = (rule.chance / rule.scale_rank) ** (1.0 / d)
    scale = dist[:, rule.scale_rank - 1]                    # (N,) r_K; capped at its median, so an item whose
    scale = np.minimum(scale, np.median(scale))             # K-th neighbour lies across a cluster's edge is not lax
    i, j, r = mutual_edges(dist, idx, f * scale, rule.k)
    group = capped_components(n, i, j, r, rule.cap)
    sizes = np.bincount(group)
    n_grouped = int((sizes[group] > 1).sum())
    used = n_grouped >= rule.min_share * n
    record.update(used=bool(used), intrinsic_dim=round(d, 3), f=round(f, 4), n_edges=int(len(r)),
                  n_grouped=n_grouped, n_groups=int((sizes > 1).sum()), largest=int(sizes.max()),
                  reason=f"{n_grouped} of {n} items ({n_grouped / n:.1%}) in groups: "
                         + ("used" if used else f"below {rule.min_share:.0%}, not used"))
    return group, record


def store_groups(reader, rows, rule=NearDupRule()):
    """Near-duplicate groups of the store rows `rows`: (group (N,) int, record with the features used)."""
    z, names = store_vectors(reader, rows, rule)
    group, record = find_groups(z, rule)
    return group, dict(record, features=names)

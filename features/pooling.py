"""Frame pooling layers of the VLAD family: NetVLAD, NetRVLAD, SoftDBoW, NetFV, NeXtVLAD.

One implementation of each, used frozen by `extract` (features/aggregates.py) and trainable by the
neural models; each is initialised from the unsupervised codebook (features/codebook.py) by its own
`from_codebook` classmethod, and `pooling_from_codebook(name, codebook)` puts the codebook's PCA
projection in front (POOLINGS is the one place a pooling is named; a new pooling is one class here with
`sizes(options)` and `from_codebook`, then `extract --poolings` caches it and `train-neural --param
vlad.pooling=NAME` trains it). Every module maps
x (B, F, d) float, mask (B, F) bool -> (B, out_dim). Padding frames (mask False) count nowhere: not in
the soft assignment's sums, not in the attention, not in the batch-norm statistics. A video with no
valid frame pools to zeros (finite), never NaN.

Equations (LOUPE, arXiv 1706.06905; NeXtVLAD, arXiv 1811.05014), i a frame, k a cluster:
    a_ik = softmax_k(x_i W + b)  or  softmax_k(BN(x_i W)),  times mask_i          W (d, K)
    NetVLAD   v_k = sum_i a_ik (x_i - c_k)              intra-L2 over d, flatten, L2   -> K d
    NetRVLAD  v_k = sum_i a_ik x_i                      same normalisation             -> K d
    SoftDBoW  v_k = sum_i a_ik                          L2                             -> K
    NetFV     u_k = sum_i a_ik (x_i - c_k) / s_k,  w_k = sum_i a_ik ((x_i - c_k)^2 / s_k^2 - 1)
              (s_k^2 the learned diagonal variance; the Fisher-vector statistics of a diagonal GMM)
              each intra- then globally L2-normalised, concatenated                  -> 2 K d
    NeXtVLAD  x' = x W_e + b_e (B, F, lam d), split into G groups x'_ig (lam d / G);
              att_ig = sigmoid(x' W_g + b_g)_g;  a_igk = softmax_k(BN(x' W_a))_gk * att_ig;
              v_k = sum_i sum_g a_igk (x'_ig - c_k)     intra-L2, flatten             -> K lam d / G
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PoolingError(ValueError):
    """A pooling asked for by a name that POOLINGS does not hold."""


def netvlad_init(centers, alpha):
    """w_k = 2 alpha c_k, b_k = -alpha |c_k|^2: softmax_k(x w + b) = softmax_k(-alpha |x - c_k|^2).

    centers (K, d) -> w (d, K), b (K,)."""
    return 2 * alpha * centers.T, -alpha * (centers ** 2).sum(1)


def _set(param, value):
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.asarray(value, np.float32)))


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the last axis whose batch statistics use valid frames only."""

    def __init__(self, channels, momentum=0.1, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, z, mask):                        # z (B, F, C), mask (B, F)
        mean, var = self.running_mean, self.running_var
        valid = z[mask]                                # (M, C) padding left out of the statistics
        if self.training and len(valid) > 1:
            mean, var = valid.mean(0), valid.var(0, unbiased=False)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * valid.var(0, unbiased=True).detach())
        return (z - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SoftAssign(nn.Module):
    """a = softmax_K(x W + b) (or BN(x W)), zero on padding frames; softmax within each of `groups`."""

    def __init__(self, dim, n_clusters, groups=1, batch_norm=False):
        super().__init__()
        self.groups, self.n_clusters = groups, n_clusters
        self.weight = nn.Parameter(torch.randn(dim, groups * n_clusters) / math.sqrt(dim))  # W (d, G K)
        self.bias = nn.Parameter(torch.zeros(groups * n_clusters))
        self.bn = MaskedBatchNorm(groups * n_clusters) if batch_norm else None

    def forward(self, x, mask):                        # x (B, F, d), mask (B, F)
        logits = x @ self.weight                       # (B, F, G K)
        logits = self.bn(logits, mask) if self.bn is not None else logits + self.bias
        if self.groups > 1:
            logits = logits.unflatten(-1, (self.groups, self.n_clusters))   # (B, F, G, K)
        a = torch.softmax(logits, dim=-1)
        m = mask.to(a.dtype)
        return a * (m[..., None, None] if self.groups > 1 else m[..., None])

    def init_from_centers(self, centers, alpha):
        """The NetVLAD initialisation: softmax_k(-alpha |x - c_k|^2) for centers (K, d)."""
        w, b = netvlad_init(centers, alpha)
        _set(self.weight, w)
        _set(self.bias, b)


def intra_global_normalize(v):
    """(B, K, d) -> (B, K d): L2 over d per cluster, flatten, L2 over all."""
    return F.normalize(F.normalize(v, dim=-1).flatten(1), dim=-1)


class NetVLAD(nn.Module):
    def __init__(self, dim, n_clusters):
        super().__init__()
        self.assign = SoftAssign(dim, n_clusters)
        self.centers = nn.Parameter(torch.randn(n_clusters, dim) / math.sqrt(dim))     # c (K, d)
        self.out_dim = n_clusters * dim

    @staticmethod
    def sizes(options):
        """Constructor arguments from the codebook's options (features/aggregates.py AggregateOptions)."""
        return {"dim": options["pca_dim"], "n_clusters": options["n_clusters"]}

    @classmethod
    def from_codebook(cls, codebook):
        pool = cls(**cls.sizes(codebook.options))
        pool.assign.init_from_centers(codebook.centers, codebook.alpha)
        _set(pool.centers, codebook.centers)
        return pool

    def forward(self, x, mask):                        # x (B, F, d), mask (B, F) -> (B, K d)
        a = self.assign(x, mask)                       # (B, F, K)
        v = torch.einsum("bfk,bfd->bkd", a, x) - a.sum(1)[..., None] * self.centers   # (B, K, d)
        return intra_global_normalize(v)


class NetRVLAD(nn.Module):
    def __init__(self, dim, n_clusters):
        super().__init__()
        self.assign = SoftAssign(dim, n_clusters)
        self.out_dim = n_clusters * dim

    @staticmethod
    def sizes(options):
        """Constructor arguments from the codebook's options (features/aggregates.py AggregateOptions)."""
        return {"dim": options["pca_dim"], "n_clusters": options["n_clusters"]}

    @classmethod
    def from_codebook(cls, codebook):
        pool = cls(**cls.sizes(codebook.options))
        pool.assign.init_from_centers(codebook.centers, codebook.alpha)
        return pool

    def forward(self, x, mask):                        # -> (B, K d)
        a = self.assign(x, mask)                       # (B, F, K)
        return intra_global_normalize(torch.einsum("bfk,bfd->bkd", a, x))


class SoftDBoW(nn.Module):
    def __init__(self, dim, n_clusters):
        super().__init__()
        self.assign = SoftAssign(dim, n_clusters)
        self.out_dim = n_clusters

    @staticmethod
    def sizes(options):
        """Constructor arguments from the codebook's options (features/aggregates.py AggregateOptions)."""
        return {"dim": options["pca_dim"], "n_clusters": options["n_clusters"]}

    @classmethod
    def from_codebook(cls, codebook):
        pool = cls(**cls.sizes(codebook.options))
        pool.assign.init_from_centers(codebook.centers, codebook.alpha)
        return pool

    def forward(self, x, mask):                        # -> (B, K)
        return F.normalize(self.assign(x, mask).sum(1), dim=-1)


class NetFV(nn.Module):
    def __init__(self, dim, n_clusters, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.assign = SoftAssign(dim, n_clusters)
        self.centers = nn.Parameter(torch.randn(n_clusters, dim) / math.sqrt(dim))     # c (K, d)
        self.std = nn.Parameter(torch.ones(n_clusters, dim))                             # s (K, d)
        self.out_dim = 2 * n_clusters * dim

    @staticmethod
    def sizes(options):
        """Constructor arguments from the codebook's options: its GMM's components are the clusters."""
        return {"dim": options["pca_dim"], "n_clusters": options["n_gmm"]}

    @classmethod
    def from_codebook(cls, codebook):
        """Assignment, centres and variances of the codebook's diagonal GMM."""
        pool = cls(**cls.sizes(codebook.options))
        pool.assign.init_from_centers(codebook.gmm_means, codebook.gmm_alpha)
        _set(pool.centers, codebook.gmm_means)
        _set(pool.std, np.sqrt(np.maximum(codebook.gmm_vars - pool.eps, 0)))   # std^2 + eps = GMM variance
        return pool

    def forward(self, x, mask):                        # -> (B, 2 K d)
        a = self.assign(x, mask)                       # (B, F, K)
        var = self.std ** 2 + self.eps                 # (K, d) squared keeps it positive while training
        a_sum = a.sum(1)[..., None]                    # (B, K, 1)
        ax = torch.einsum("bfk,bfd->bkd", a, x)        # (B, K, d)  sum_i a_ik x_i
        ax2 = torch.einsum("bfk,bfd->bkd", a, x * x)   # (B, K, d)  sum_i a_ik x_i^2
        c = self.centers
        first = (ax - a_sum * c) / var.sqrt()
        second = (ax2 - 2 * ax * c + a_sum * c * c) / var - a_sum     # sum_i a_ik ((x-c)^2/s^2 - 1)
        return torch.cat([intra_global_normalize(first), intra_global_normalize(second)], dim=-1)


class NeXtVLAD(nn.Module):
    """NeXtVLAD: aggregate G low-dimensional groups of an expanded frame, weighted by group attention.

    Without labels (`from_codebook`) it is initialised so that it is already a
    sensible VLAD: the expansion is [I | Q_1 .. Q_{lam-1}] (identity plus seeded random rotations of
    the PCA-reduced frame, so each group sees lam d / G directions of it), the cluster centres are a
    k-means codebook of the group sub-vectors of sampled frames, the assignment weights are the NetVLAD
    initialisation applied group by group (block diagonal), with the batch norm's running statistics set
    to those of the sampled logits and its affine part set to undo them (BN(z) == z + b in eval mode),
    and the group attention starts uniform (weights 0, bias 0: sigmoid = 1/2 for every group), since
    no group can be preferred without labels; the neural models learn it.
    """

    def __init__(self, dim, n_clusters, expansion=2, groups=8):
        super().__init__()
        if (expansion * dim) % groups:
            raise ValueError(f"NeXtVLAD: expansion * dim = {expansion * dim} is not divisible by "
                             f"groups = {groups}")
        self.groups, self.group_dim = groups, expansion * dim // groups
        self.expand = nn.Linear(dim, expansion * dim)                 # W_e (d, lam d)
        self.attention = nn.Linear(expansion * dim, groups)           # W_g (lam d, G)
        self.assign = SoftAssign(expansion * dim, n_clusters, groups=groups, batch_norm=True)
        self.centers = nn.Parameter(torch.randn(n_clusters, self.group_dim) / math.sqrt(self.group_dim))
        self.out_dim = n_clusters * self.group_dim

    @staticmethod
    def sizes(options):
        """Constructor arguments from the codebook's options."""
        return {"dim": options["pca_dim"], "n_clusters": options["n_clusters"],
                "expansion": options["nextvlad_expansion"], "groups": options["nextvlad_groups"]}

    @classmethod
    def from_codebook(cls, codebook):
        o = codebook.options
        pool = cls(**cls.sizes(o))
        w, b = netvlad_init(codebook.nextvlad_centers, codebook.nextvlad_alpha)   # (lam d / G, K), (K,)
        _set(pool.expand.weight, codebook.nextvlad_expansion.T)
        _set(pool.expand.bias, np.zeros(pool.expand.bias.shape))
        _set(pool.attention.weight, np.zeros(pool.attention.weight.shape))     # uniform attention
        _set(pool.attention.bias, np.zeros(pool.attention.bias.shape))
        _set(pool.assign.weight, np.kron(np.eye(pool.groups), w))              # block diagonal (lam d, G K)
        _set(pool.assign.bias, np.zeros(pool.assign.bias.shape))               # unused: BN carries the bias
        bn = pool.assign.bn
        _set(bn.running_mean, codebook.nextvlad_logit_mean)
        _set(bn.running_var, codebook.nextvlad_logit_var)
        _set(bn.weight, np.sqrt(codebook.nextvlad_logit_var + bn.eps))         # eval-mode BN(z) = z + b
        _set(bn.bias, codebook.nextvlad_logit_mean + np.tile(b, pool.groups))
        _set(pool.centers, codebook.nextvlad_centers)
        return pool

    def forward(self, x, mask):                        # -> (B, K lam d / G)
        x = self.expand(x)                             # (B, F, lam d)
        att = torch.sigmoid(self.attention(x))         # (B, F, G)
        a = self.assign(x, mask) * att[..., None]      # (B, F, G, K) zero on padding via assign
        groups = x.unflatten(-1, (self.groups, self.group_dim))       # (B, F, G, lam d / G)
        v = torch.einsum("bfgk,bfgj->bkj", a, groups) - a.sum((1, 2))[..., None] * self.centers
        return F.normalize(v, dim=-1).flatten(1)       # (B, K lam d / G)


POOLINGS = {"netvlad": NetVLAD, "netrvlad": NetRVLAD, "softdbow": SoftDBoW, "netfv": NetFV,
            "nextvlad": NeXtVLAD}


class CodebookPooling(nn.Module):
    """The codebook's PCA projection (D -> d) followed by one pooling layer: (B, F, D) -> (B, out_dim)."""

    def __init__(self, projection, pool):
        super().__init__()
        self.projection, self.pool, self.out_dim = projection, pool, pool.out_dim

    def forward(self, x, mask):                    # x (B, F, D), mask (B, F)
        return self.pool(self.projection(x), mask)


def pca_projection(codebook):
    """nn.Linear(D, d) computing (x - pca_mean) @ pca_components.T."""
    d, dim = codebook.pca_components.shape
    linear = nn.Linear(dim, d)
    _set(linear.weight, codebook.pca_components)                                    # (d, D)
    _set(linear.bias, -codebook.pca_components @ codebook.pca_mean)
    return linear


def pooling_class(name):
    """The pooling layer class named `name` in POOLINGS; another name is refused, naming the choices."""
    if name not in POOLINGS:
        raise PoolingError(f"unknown pooling {name!r}; choose from {sorted(POOLINGS)}")
    return POOLINGS[name]


def pooling_from_codebook(name, codebook):
    """CodebookPooling of the pooling `name` initialised from `codebook` (features/codebook.py), eval mode."""
    return CodebookPooling(pca_projection(codebook), pooling_class(name).from_codebook(codebook)).eval()


def empty_pooling(name, frame_dim, options):
    """The structure pooling_from_codebook(name, codebook) builds, from the codebook's options alone
    (weights unset, to be loaded): (B, F, D = frame_dim) -> (B, out_dim)."""
    cls = pooling_class(name)
    return CodebookPooling(nn.Linear(frame_dim, options["pca_dim"]), cls(**cls.sizes(options)))

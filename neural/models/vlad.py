"""vlad: a trainable NeXtVLAD (or any pooling of features/pooling.py) over frames, SE context gating, fused
with the pooled text: the challenge baseline's design on cached features.

The pooling (with the PCA projection in front) is the aggregates stage's layer (features/pooling.py).
Its structure comes from the spec's VladParams (pooling, chosen with --param vlad.pooling; its sizes,
taken from the codebook) and its weights from the checkpoint; the cache's
codebook only initialises it for training (`initialise`), so a saved fold model predicts without the cache.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from core import schema
from features.pooling import POOLINGS, empty_pooling
from neural.models.base import FoldModel, ModelEntry, param
from neural.models.blocks import FRAMES_AND_POOLED_TEXT, ContextGating, Heads, Projection, ensure_one, pooled_text


class VladError(ValueError):
    """A vlad spec or codebook that cannot make the pooling."""


@dataclass
class VladParams:
    pooling: str = param("nextvlad", f"the trainable pooling of the frames, one of features/pooling.py's: "
                                     f"{', '.join(POOLINGS)}")
    pca_dim: int = param(0, "d of the PCA projection in front of the pooling", fixed="codebook.h5 (extract --pca-dim)")
    clusters: int = param(0, "K, clusters of the pooling", fixed="codebook.h5 (extract --clusters)")
    expansion: int = param(0, "nextvlad: lambda", fixed="codebook.h5")
    groups: int = param(0, "nextvlad: G", fixed="codebook.h5")
    gmm: int = param(0, "netfv: GMM components", fixed="codebook.h5 (extract --gmm-components)")

    def check(self):
        if self.pooling not in POOLINGS:
            raise VladError(f"vlad.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")

    def codebook_options(self):
        """The codebook options the pooling's structure is built from (features/pooling.py `sizes`)."""
        return {"pca_dim": self.pca_dim, "n_clusters": self.clusters, "nextvlad_expansion": self.expansion,
                "nextvlad_groups": self.groups, "n_gmm": self.gmm}


def pooling_of(params, frame_dim):
    """(B, F, D) -> (B, W): the PCA projection (D -> d) and the pooling, shaped by VladParams, weights unset."""
    try:
        params.check()
        if params.pca_dim < 1:
            raise VladError(f"pca_dim is {params.pca_dim}")
        return empty_pooling(params.pooling, frame_dim, params.codebook_options())
    except (ValueError, TypeError, ZeroDivisionError) as err:
        raise VladError(f"vlad spec: pooling {params.pooling!r} with sizes {params.codebook_options()} cannot be "
                        f"built ({err})") from err


class VladFusion(FoldModel):
    def __init__(self, spec):
        super().__init__()
        from neural.models import spec_params
        h, p, params = spec.hidden, spec.dropout, spec_params(spec)
        self.spec_pooling, self.frame_dim = params.pooling, spec.frame_dim
        self.pooling = pooling_of(params, spec.frame_dim)             # (B, F, D) -> (B, W)
        self.video = nn.Sequential(nn.Dropout(p), nn.Linear(self.pooling.out_dim, h), nn.LayerNorm(h))
        self.video_gate = ContextGating(h)
        self.text = Projection(3 * spec.text_dim + 3, h, p)
        self.fuse = nn.Sequential(nn.Linear(2 * h, h), nn.GELU())
        self.fuse_gate = ContextGating(h)
        self.heads = Heads(h, spec.n_fine, spec.n_coarse, p)

    @classmethod
    def params_from_cache(cls, params, codebook=None):
        """The pooling's sizes are the codebook's (CACHE_DIR/codebook.h5), which initialises it."""
        o = codebook.options
        return replace(params, pca_dim=int(o["pca_dim"]), clusters=int(o["n_clusters"]),
                       expansion=int(o["nextvlad_expansion"]), groups=int(o["nextvlad_groups"]), gmm=int(o["n_gmm"]))

    def initialise(self, context):
        """The pooling starts as the one `extract` fitted without labels (CACHE_DIR/codebook.h5)."""
        from features.pooling import pooling_from_codebook
        codebook = context.codebook
        if codebook.frame_dim != self.frame_dim:
            raise VladError(f"codebook fitted on {codebook.frame_dim}-d frames, the store has {self.frame_dim}-d "
                            "frames; rerun extract for this cache directory")
        fitted = pooling_from_codebook(self.spec_pooling, codebook)
        self.pooling.load_state_dict(fitted.state_dict())             # same structure: refuses otherwise

    def forward(self, batch):
        frame_mask = ensure_one(batch[schema.FRAME_MASK])               # (B, F)
        video = self.video_gate(self.video(self.pooling(batch[schema.FRAME_EMB], frame_mask)))  # (B, H)
        text = self.text(pooled_text(batch))                            # (B, H)
        return self.heads(self.fuse_gate(self.fuse(torch.cat([video, text], dim=1))))


ENTRY = ModelEntry("vlad", VladFusion, FRAMES_AND_POOLED_TEXT,
                   "a trainable NeXtVLAD (or another pooling) initialised from the cached codebook, SE context "
                   "gating, fused with pooled text", needs_codebook=True, order=40, Params=VladParams,
                   legacy=(("vlad_pooling", "pooling"), ("vlad_pca_dim", "pca_dim"), ("vlad_clusters", "clusters"),
                           ("vlad_expansion", "expansion"), ("vlad_groups", "groups")))

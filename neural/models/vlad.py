"""vlad: a trainable NeXtVLAD (or NetVLAD) over frames, SE context gating, fused with the pooled text:
the challenge baseline's design on cached features.

The pooling (with the PCA projection in front) is the aggregates stage's layer (features/pooling.py).
Its structure comes from the ModelSpec (vlad_pooling, vlad_pca_dim, vlad_clusters, vlad_expansion,
vlad_groups) and its weights from the checkpoint; the cache's codebook only initialises it for
training (`initialise`), so a saved fold model predicts without the cache.
"""
import torch
import torch.nn as nn

from core import schema
from features.pooling import CodebookPooling, NetVLAD, NeXtVLAD
from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import FRAMES_AND_POOLED_TEXT, ContextGating, Heads, Projection, ensure_one, pooled_text

POOLINGS = ("nextvlad", "netvlad")


class VladError(ValueError):
    """A vlad spec or codebook that cannot make the pooling."""


def empty_pooling(spec):
    """(B, F, D) -> (B, W): the PCA projection (D -> d) and the pooling, shaped by the spec, weights unset."""
    d, k = spec.vlad_pca_dim, spec.vlad_clusters
    if spec.vlad_pooling not in POOLINGS or d < 1 or k < 1:
        raise VladError(f"vlad spec: pooling {spec.vlad_pooling!r} with pca_dim {d} and {k} clusters cannot be "
                        f"built; pooling is one of {', '.join(POOLINGS)}")
    pool = (NeXtVLAD(d, k, spec.vlad_expansion, spec.vlad_groups) if spec.vlad_pooling == "nextvlad"
            else NetVLAD(d, k))
    return CodebookPooling(nn.Linear(spec.frame_dim, d), pool)


class VladFusion(FoldModel):
    def __init__(self, spec):
        super().__init__()
        h, p = spec.hidden, spec.dropout
        self.spec_pooling, self.frame_dim = spec.vlad_pooling, spec.frame_dim
        self.pooling = empty_pooling(spec)                             # (B, F, D) -> (B, W)
        self.video = nn.Sequential(nn.Dropout(p), nn.Linear(self.pooling.out_dim, h), nn.LayerNorm(h))
        self.video_gate = ContextGating(h)
        self.text = Projection(3 * spec.text_dim + 3, h, p)
        self.fuse = nn.Sequential(nn.Linear(2 * h, h), nn.GELU())
        self.fuse_gate = ContextGating(h)
        self.heads = Heads(h, spec.n_fine, spec.n_coarse, p)

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
                   "a trainable NeXtVLAD/NetVLAD head initialised from the cached codebook, SE context "
                   "gating, fused with pooled text", needs_codebook=True)

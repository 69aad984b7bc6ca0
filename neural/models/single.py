"""single: text tokens and frames, tagged by modality, in one transformer; mean over real positions."""
import torch.nn as nn

from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import TOKENS_AND_FRAMES, Heads, TokensAndFrames, encoder, joint_states, pool_all


class SingleStream(FoldModel):
    def __init__(self, spec):
        super().__init__()
        self.front = TokensAndFrames(spec)
        self.encoder = encoder(spec.hidden, spec.n_heads, spec.n_layers, spec.dropout)
        self.norm = nn.LayerNorm(spec.hidden)
        self.heads = Heads(spec.hidden, spec.n_fine, spec.n_coarse, spec.dropout)

    def encode(self, batch):
        """-> text (B, T, H), text_mask, video (B, F, H), video_mask: the states before pooling."""
        return joint_states(self.encoder, self.norm, *self.front(batch))

    pool = staticmethod(pool_all)      # (B, H) the mean over every real position, text and video alike

    def forward(self, batch):
        return self.heads(self.pool(*self.encode(batch)))


ENTRY = ModelEntry("single", SingleStream, TOKENS_AND_FRAMES,
                   "text tokens and frames, tagged by modality, in one transformer", order=10)

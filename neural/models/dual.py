"""dual: a text transformer and a video transformer, concatenated into a fusion transformer; mean pooled."""
import torch.nn as nn

from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import TOKENS_AND_FRAMES, Heads, TokensAndFrames, encoder, joint_states, pool_all


class DualStream(FoldModel):
    def __init__(self, spec):
        super().__init__()
        args = (spec.hidden, spec.n_heads, spec.n_layers, spec.dropout)
        self.front = TokensAndFrames(spec)
        self.text_encoder, self.video_encoder, self.fusion = encoder(*args), encoder(*args), encoder(*args)
        self.norm = nn.LayerNorm(spec.hidden)
        self.heads = Heads(spec.hidden, spec.n_fine, spec.n_coarse, spec.dropout)

    def encode(self, batch):
        """-> text (B, T, H), text_mask, video (B, F, H), video_mask: the fused states before pooling."""
        text, text_mask, video, video_mask = self.front(batch)
        text = self.text_encoder(text, src_key_padding_mask=~text_mask)        # (B, T, H)
        video = self.video_encoder(video, src_key_padding_mask=~video_mask)    # (B, F, H)
        return joint_states(self.fusion, self.norm, text, text_mask, video, video_mask)

    pool = staticmethod(pool_all)      # (B, H) the mean over every real position, text and video alike

    def forward(self, batch):
        return self.heads(self.pool(*self.encode(batch)))


ENTRY = ModelEntry("dual", DualStream, TOKENS_AND_FRAMES,
                   "a text and a video transformer, then a fusion transformer", order=20)

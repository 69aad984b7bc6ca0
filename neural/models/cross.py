"""cross: text queries attend to video and video queries attend to text; each side mean pooled."""
import torch
import torch.nn as nn

from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import TOKENS_AND_FRAMES, Heads, TokensAndFrames, masked_mean


class CrossBlock(nn.Module):
    """Pre-norm cross-attention: queries (B, Lq, H) attend to keys (B, Lk, H), then a feed-forward."""

    def __init__(self, hidden, n_heads, dropout):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_ff = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, n_heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(4 * hidden, hidden), nn.Dropout(dropout))

    def forward(self, q, k, k_mask):
        kv = self.norm_k(k)
        q = q + self.attn(self.norm_q(q), kv, kv, key_padding_mask=~k_mask, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))                             # (B, Lq, H)


class CrossAttention(FoldModel):
    def __init__(self, spec):
        super().__init__()
        h, heads, p = spec.hidden, spec.n_heads, spec.dropout
        self.front = TokensAndFrames(spec)
        self.text_to_video = nn.ModuleList(CrossBlock(h, heads, p) for _ in range(spec.n_layers))
        self.video_to_text = nn.ModuleList(CrossBlock(h, heads, p) for _ in range(spec.n_layers))
        self.fuse = nn.Sequential(nn.LayerNorm(2 * h), nn.Linear(2 * h, h), nn.GELU())
        self.heads = Heads(h, spec.n_fine, spec.n_coarse, p)

    def encode(self, batch):
        """-> text (B, T, H), text_mask, video (B, F, H), video_mask: the states before pooling."""
        text, text_mask, video, video_mask = self.front(batch)
        for t2v, v2t in zip(self.text_to_video, self.video_to_text):
            text, video = t2v(text, video, video_mask), v2t(video, text, text_mask)
        return text, text_mask, video, video_mask

    def pool(self, text, text_mask, video, video_mask):
        """-> (B, H) each side's mean, fused."""
        z = torch.cat([masked_mean(text, text_mask), masked_mean(video, video_mask)], dim=1)  # (B, 2H)
        return self.fuse(z)

    def forward(self, batch):
        return self.heads(self.pool(*self.encode(batch)))


ENTRY = ModelEntry("cross", CrossAttention, TOKENS_AND_FRAMES,
                   "video attends to text and text to video", order=30)

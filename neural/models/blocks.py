"""Blocks shared by the models: masks, projections, heads, a transformer encoder, gating, the input tuples.

Shapes: B batch, T text tokens, F frames, D frame dim, Dt text dim, H hidden, C fine classes,
C1 coarse classes. Masks are bool, True for a real position.
"""
import torch
import torch.nn as nn

from core import schema


def ensure_one(mask):
    """(B, L) mask with position 0 switched on in rows that have none, so attention never sees an
    all-padding row (NaN softmax); such rows then carry the zero embedding the store wrote there."""
    empty = ~mask.any(dim=1, keepdim=True)                  # (B, 1)
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (empty & first)


def masked_mean(x, mask):
    """x (B, L, H), mask (B, L) -> (B, H) mean over real positions."""
    w = mask.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1.0)


def joint_states(encoder, norm, text, text_mask, video, video_mask):
    """One transformer over text and video positions together: -> text (B, T, H), text_mask, video (B, F, H),
    video_mask, the states split back by modality (single's body, dual's fusion)."""
    x = torch.cat([text, video], dim=1)                                # (B, T+F, H)
    mask = torch.cat([text_mask, video_mask], dim=1)                   # (B, T+F)
    x = norm(encoder(x, src_key_padding_mask=~mask))
    t = text.shape[1]
    return x[:, :t], text_mask, x[:, t:], video_mask


def pool_all(text, text_mask, video, video_mask):
    """-> (B, H) the mean over every real position, text and video alike."""
    return masked_mean(torch.cat([text, video], dim=1), torch.cat([text_mask, video_mask], dim=1))


def pooled_text(batch):
    """text_pooled (B, 3, Dt) with absent fields zeroed, flattened with its mask -> (B, 3*Dt + 3)."""
    mask = batch[schema.TEXT_FIELD_MASK]                                # (B, 3)
    text = batch[schema.TEXT_POOLED] * mask.unsqueeze(-1).to(batch[schema.TEXT_POOLED].dtype)
    return torch.cat([text.flatten(1), mask.to(text.dtype)], dim=1)


class Projection(nn.Module):
    """(B, ..., D_in) -> (B, ..., H): LayerNorm first because encoders differ wildly in scale."""

    def __init__(self, d_in, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Heads(nn.Module):
    """(B, H) -> fine logits (B, C), coarse logits (B, C1); the coarse head is the auxiliary task."""

    def __init__(self, hidden, n_fine, n_coarse, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fine = nn.Linear(hidden, n_fine)
        self.coarse = nn.Linear(hidden, n_coarse)

    def forward(self, z):
        z = self.drop(z)
        return self.fine(z), self.coarse(z)


def encoder(hidden, n_heads, n_layers, dropout):
    layer = nn.TransformerEncoderLayer(hidden, n_heads, 4 * hidden, dropout, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class ContextGating(nn.Module):
    """SE-style gating of a (B, H) vector by itself, as in the YouTube-8M / WeChat baseline."""

    def __init__(self, hidden, reduction=4):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(hidden, hidden // reduction), nn.ReLU(),
                                  nn.Linear(hidden // reduction, hidden), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class TokensAndFrames(nn.Module):
    """Shared front of the transformer models: project text tokens and frames to H, tag the modality,
    add a learned frame position. -> text (B, T, H), text_mask, video (B, F, H), video_mask."""

    def __init__(self, spec):
        super().__init__()
        h, p = spec.hidden, spec.dropout
        self.text_proj = Projection(spec.text_dim, h, p)
        self.frame_proj = Projection(spec.frame_dim, h, p)
        self.modality = nn.Parameter(torch.zeros(2, h))               # (2, H) text, video
        self.frame_pos = nn.Parameter(torch.zeros(spec.n_frames, h))  # (F, H)
        nn.init.normal_(self.modality, std=0.02)
        nn.init.normal_(self.frame_pos, std=0.02)

    def forward(self, batch):
        text_mask = ensure_one(batch[schema.TEXT_TOKEN_MASK])         # (B, T)
        video_mask = ensure_one(batch[schema.FRAME_MASK])             # (B, F)
        text = self.text_proj(batch[schema.TEXT_TOKENS]) + self.modality[0]             # (B, T, H)
        frames = batch[schema.FRAME_EMB]
        video = self.frame_proj(frames) + self.modality[1] + self.frame_pos[:frames.shape[1]]  # (B, F, H)
        return text, text_mask, video, video_mask


TOKENS_AND_FRAMES = (schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK, schema.FRAME_EMB, schema.FRAME_MASK)
FRAMES_AND_POOLED_TEXT = (schema.FRAME_EMB, schema.FRAME_MASK, schema.TEXT_POOLED, schema.TEXT_FIELD_MASK)
POOLED_TEXT = (schema.TEXT_POOLED, schema.TEXT_FIELD_MASK)

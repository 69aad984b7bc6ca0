"""The fusion models, on cached embeddings. Each maps a batch dict to (fine logits, coarse logits).

Shapes: B batch, T text tokens, F frames, D frame dim, Dt text dim, H hidden, C fine classes,
C1 coarse classes. Masks are bool, True for a real position.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from features import schema


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


class TokensAndFrames(nn.Module):
    """Shared front of the transformer models: project text tokens and frames to H, tag the modality,
    add a learned frame position. -> text (B, T, H), text_mask, video (B, F, H), video_mask."""

    def __init__(self, spec):
        super().__init__()
        h, p = spec["hidden"], spec["dropout"]
        self.text_proj = Projection(spec["text_dim"], h, p)
        self.frame_proj = Projection(spec["frame_dim"], h, p)
        self.modality = nn.Parameter(torch.zeros(2, h))               # (2, H) text, video
        self.frame_pos = nn.Parameter(torch.zeros(spec["n_frames"], h))  # (F, H)
        nn.init.normal_(self.modality, std=0.02)
        nn.init.normal_(self.frame_pos, std=0.02)

    def forward(self, batch):
        text_mask = ensure_one(batch[schema.TEXT_TOKEN_MASK])         # (B, T)
        video_mask = ensure_one(batch[schema.FRAME_MASK])             # (B, F)
        text = self.text_proj(batch[schema.TEXT_TOKENS]) + self.modality[0]             # (B, T, H)
        frames = batch[schema.FRAME_EMB]
        video = self.frame_proj(frames) + self.modality[1] + self.frame_pos[:frames.shape[1]]  # (B, F, H)
        return text, text_mask, video, video_mask


class SingleStream(nn.Module):
    """Text tokens and frames concatenated into one transformer; mean over real positions."""

    def __init__(self, spec):
        super().__init__()
        h = spec["hidden"]
        self.front = TokensAndFrames(spec)
        self.encoder = encoder(h, spec["n_heads"], spec["n_layers"], spec["dropout"])
        self.norm = nn.LayerNorm(h)
        self.heads = Heads(h, spec["n_fine"], spec["n_coarse"], spec["dropout"])

    def forward(self, batch):
        text, text_mask, video, video_mask = self.front(batch)
        x = torch.cat([text, video], dim=1)                           # (B, T+F, H)
        mask = torch.cat([text_mask, video_mask], dim=1)              # (B, T+F)
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        return self.heads(masked_mean(x, mask))


class DualStream(nn.Module):
    """A text transformer and a video transformer, concatenated into a fusion transformer; mean pooled."""

    def __init__(self, spec):
        super().__init__()
        h, args = spec["hidden"], (spec["hidden"], spec["n_heads"], spec["n_layers"], spec["dropout"])
        self.front = TokensAndFrames(spec)
        self.text_encoder, self.video_encoder, self.fusion = encoder(*args), encoder(*args), encoder(*args)
        self.norm = nn.LayerNorm(h)
        self.heads = Heads(h, spec["n_fine"], spec["n_coarse"], spec["dropout"])

    def forward(self, batch):
        text, text_mask, video, video_mask = self.front(batch)
        text = self.text_encoder(text, src_key_padding_mask=~text_mask)        # (B, T, H)
        video = self.video_encoder(video, src_key_padding_mask=~video_mask)    # (B, F, H)
        x = torch.cat([text, video], dim=1)                                    # (B, T+F, H)
        mask = torch.cat([text_mask, video_mask], dim=1)
        x = self.norm(self.fusion(x, src_key_padding_mask=~mask))
        return self.heads(masked_mean(x, mask))


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


class CrossAttention(nn.Module):
    """Text queries attend to video and video queries attend to text; each side mean pooled, concatenated."""

    def __init__(self, spec):
        super().__init__()
        h, heads, p = spec["hidden"], spec["n_heads"], spec["dropout"]
        self.front = TokensAndFrames(spec)
        self.text_to_video = nn.ModuleList(CrossBlock(h, heads, p) for _ in range(spec["n_layers"]))
        self.video_to_text = nn.ModuleList(CrossBlock(h, heads, p) for _ in range(spec["n_layers"]))
        self.fuse = nn.Sequential(nn.LayerNorm(2 * h), nn.Linear(2 * h, h), nn.GELU())
        self.heads = Heads(h, spec["n_fine"], spec["n_coarse"], p)

    def forward(self, batch):
        text, text_mask, video, video_mask = self.front(batch)
        for t2v, v2t in zip(self.text_to_video, self.video_to_text):
            text, video = t2v(text, video, video_mask), v2t(video, text, text_mask)
        z = torch.cat([masked_mean(text, text_mask), masked_mean(video, video_mask)], dim=1)  # (B, 2H)
        return self.heads(self.fuse(z))


class ContextGating(nn.Module):
    """SE-style gating of a (B, H) vector by itself, as in the YouTube-8M / WeChat baseline."""

    def __init__(self, hidden, reduction=4):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(hidden, hidden // reduction), nn.ReLU(),
                                  nn.Linear(hidden // reduction, hidden), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


def pooled_text(batch):
    """text_pooled (B, 3, Dt) with absent fields zeroed, flattened with its mask -> (B, 3*Dt + 3)."""
    mask = batch[schema.TEXT_FIELD_MASK]                                # (B, 3)
    text = batch[schema.TEXT_POOLED] * mask.unsqueeze(-1).to(batch[schema.TEXT_POOLED].dtype)
    return torch.cat([text.flatten(1), mask.to(text.dtype)], dim=1)


class VladFusion(nn.Module):
    """Trainable (Ne)XtVLAD over frames (initialised from the cached codebook), SE context gating,
    fused with the pooled text: the challenge baseline's design on cached features."""

    def __init__(self, spec, pooling):
        super().__init__()
        h, p = spec["hidden"], spec["dropout"]
        self.pooling = pooling                                          # (B, F, D) -> (B, W)
        self.video = nn.Sequential(nn.Dropout(p), nn.Linear(pooling.out_dim, h), nn.LayerNorm(h))
        self.video_gate = ContextGating(h)
        self.text = Projection(3 * spec["text_dim"] + 3, h, p)
        self.fuse = nn.Sequential(nn.Linear(2 * h, h), nn.GELU())
        self.fuse_gate = ContextGating(h)
        self.heads = Heads(h, spec["n_fine"], spec["n_coarse"], p)

    def forward(self, batch):
        frame_mask = ensure_one(batch[schema.FRAME_MASK])               # (B, F)
        video = self.video_gate(self.video(self.pooling(batch[schema.FRAME_EMB], frame_mask)))  # (B, H)
        text = self.text(pooled_text(batch))                            # (B, H)
        return self.heads(self.fuse_gate(self.fuse(torch.cat([video, text], dim=1))))


class GatedBlock(nn.Module):
    """x + W2(GELU(W1 x) * sigmoid(Wg x)), pre-norm: a gated MLP block."""

    def __init__(self, hidden, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up, self.gate = nn.Linear(hidden, 2 * hidden), nn.Linear(hidden, 2 * hidden)
        self.down = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(F.gelu(self.up(y)) * torch.sigmoid(self.gate(y)))


class GatedMLP(nn.Module):
    """Pooled text and the engineered aggregates (each layer-normed, since their scales differ),
    concatenated and passed through gated MLP blocks."""

    def __init__(self, spec):
        super().__init__()
        h, p = spec["hidden"], spec["dropout"]
        self.agg_names = list(spec["aggregates"])
        self.agg_norms = nn.ModuleList(nn.LayerNorm(w) for w in spec["aggregate_widths"])
        width = 3 * spec["text_dim"] + 3 + sum(spec["aggregate_widths"])
        self.inp = Projection(width, h, p)
        self.blocks = nn.Sequential(*(GatedBlock(h, p) for _ in range(max(spec["n_layers"], 1) + 1)))
        self.heads = Heads(h, spec["n_fine"], spec["n_coarse"], p)

    def forward(self, batch):
        parts = [pooled_text(batch)] + [norm(batch[n]) for n, norm in zip(self.agg_names, self.agg_norms)]
        return self.heads(self.blocks(self.inp(torch.cat(parts, dim=1))))      # x (B, H) before heads


class Linear(nn.Module):
    """Softmax regression on [mean frame, pooled text fields], each feature standardised by running
    statistics (BatchNorm without affine): the strong linear baseline, trained like the others."""

    def __init__(self, spec):
        super().__init__()
        width = spec["frame_dim"] + 3 * spec["text_dim"] + 3
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.heads = Heads(width, spec["n_fine"], spec["n_coarse"], spec["dropout"])

    def forward(self, batch):
        frames = masked_mean(batch[schema.FRAME_EMB], batch[schema.FRAME_MASK])     # (B, D)
        return self.heads(self.norm(torch.cat([frames, pooled_text(batch)], dim=1)))


class NamePrior(nn.Module):
    """Zero-shot scores: cosine of each pooled text field with each class name's embedding
    (features/class_names.py), times a learned temperature per field and level. It has no per-class
    weight, so a class with no training video scores like one with many: the stack's evidence for the
    rarest classes. The name vectors are buffers: given when training, restored with the state dict."""

    def __init__(self, spec, class_names=None):
        super().__init__()
        fine = torch.zeros(spec["n_fine"], spec["text_dim"])               # (C, Dt)
        coarse = torch.zeros(spec["n_coarse"], spec["text_dim"])           # (C1, Dt)
        if class_names is not None:
            fine = F.normalize(torch.as_tensor(class_names.fine_emb, dtype=torch.float32), dim=-1)
            coarse = F.normalize(torch.as_tensor(class_names.coarse_emb, dtype=torch.float32), dim=-1)
        self.register_buffer("fine_names", fine)
        self.register_buffer("coarse_names", coarse)
        self.log_scale = nn.Parameter(torch.full((2, len(schema.TEXT_FIELDS)), math.log(20.0)))  # (level, field)

    def forward(self, batch):
        text = F.normalize(batch[schema.TEXT_POOLED].float(), dim=-1)        # (B, 3, Dt)
        weight = self.log_scale.exp()                                        # (2, 3)
        mask = batch[schema.TEXT_FIELD_MASK].float()                         # (B, 3)
        fine = torch.einsum("bfd,cd,bf->bc", text, self.fine_names, mask * weight[0])
        coarse = torch.einsum("bfd,cd,bf->bc", text, self.coarse_names, mask * weight[1])
        return fine, coarse


def build_model(spec, codebook_path=None, class_names=None):
    """spec: dict of dims and options (see train.model_spec); vlad also needs the codebook file, names
    the class-name vectors when training (a saved model brings its own)."""
    name = spec["model"]
    if name == "single":
        return SingleStream(spec)
    if name == "dual":
        return DualStream(spec)
    if name == "cross":
        return CrossAttention(spec)
    if name == "mlp":
        return GatedMLP(spec)
    if name == "linear":
        return Linear(spec)
    if name == "names":
        return NamePrior(spec, class_names)
    if name == "vlad":
        from neural.vlad import build_pooling
        return VladFusion(spec, build_pooling(spec, codebook_path))
    raise ValueError(f"unknown model {name!r}")

"""mlp: a gated MLP on the pooled text and the engineered aggregates (agg/*) of extract."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import POOLED_TEXT, Heads, Projection, pooled_text


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


class GatedMLP(FoldModel):
    """Pooled text and the aggregates (each layer-normed, since their scales differ), concatenated and
    passed through gated MLP blocks."""

    def __init__(self, spec):
        super().__init__()
        h, p = spec.hidden, spec.dropout
        self.agg_names = list(spec.aggregates)
        self.agg_norms = nn.ModuleList(nn.LayerNorm(w) for w in spec.aggregate_widths)
        width = 3 * spec.text_dim + 3 + sum(spec.aggregate_widths)
        self.inp = Projection(width, h, p)
        self.blocks = nn.Sequential(*(GatedBlock(h, p) for _ in range(max(spec.n_layers, 1) + 1)))
        self.heads = Heads(h, spec.n_fine, spec.n_coarse, p)

    def forward(self, batch):
        parts = [pooled_text(batch)] + [norm(batch[n]) for n, norm in zip(self.agg_names, self.agg_norms)]
        return self.heads(self.blocks(self.inp(torch.cat(parts, dim=1))))      # x (B, H) before heads


ENTRY = ModelEntry("mlp", GatedMLP, POOLED_TEXT, "a gated MLP on pooled text and the cached aggregates",
                   reads_aggregates=True, order=50)

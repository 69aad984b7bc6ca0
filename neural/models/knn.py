"""knn: retrieval votes. A video's k nearest labelled videos (cosine) vote for their fine classes, each
vote weighted by exp(similarity / temperature); the coarse votes are the fine votes summed per coarse class.

The representation: the mean frame and the pooled text fields (absent fields zeroed), each block
L2-normalised and concatenated (a block that is empty in a row, as text is throughout a frames-only
store, is zero there and adds nothing), centred and projected onto the top `dim` principal axes of
the fold's training rows, then L2-normalised. Nothing is trained: `initialise` fits the projection and
fills the bank (the training rows' vectors, float16, and their labels), all of it buffers, so the fold
checkpoint carries the whole model. Out-of-fold by construction: the pipeline gives `initialise` only the
fold's training rows, so a held-out row never finds itself.

The search is blocked: queries against `block_rows` bank rows at a time with a running top-k, so memory
is bounded by the block size, not by the bank.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core import schema
from neural.data import loader, ordered_batches
from neural.models.base import FoldModel, ModelEntry, param
from neural.models.blocks import FRAMES_AND_POOLED_TEXT, masked_mean

FLOOR = 1e-6                   # mixed into the vote probabilities so their log is finite


@dataclass
class KnnParams:                # k, temperature: measured by `python -m bench knn heldout`
    k: int = param(20, "neighbours that vote")
    temperature: float = param(0.1, "a neighbour's vote weighs exp(cosine / temperature)")
    dim: int = param(128, "PCA width of the bank of training vectors (0: no projection)")

    def check(self):
        if self.k < 1 or self.temperature <= 0 or self.dim < 0:
            raise ValueError(f"knn.k must be >= 1, knn.temperature > 0 and knn.dim >= 0, got "
                             f"{self.k}, {self.temperature} and {self.dim}")


def representation(batch):
    """[mean frame, pooled text fields], each block L2-normalised (a zero block stays zero) -> (B, D + 3 Dt)."""
    frames = masked_mean(batch[schema.FRAME_EMB], batch[schema.FRAME_MASK])                 # (B, D)
    mask = batch[schema.TEXT_FIELD_MASK].unsqueeze(-1).to(frames.dtype)                    # (B, 3, 1)
    text = (batch[schema.TEXT_POOLED] * mask).flatten(1)                                   # (B, 3 Dt)
    return torch.cat([F.normalize(frames.float(), dim=1), F.normalize(text.float(), dim=1)], dim=1)


def top_k(queries, bank, k, block_rows):
    """Running top-k of cosine similarities over the bank in blocks of rows.
    queries (B, d) float32, bank (N, d) -> (similarities (B, k'), bank rows (B, k')), k' = min(k, N)."""
    k = min(k, len(bank))
    best_sim = queries.new_full((len(queries), 0), float("-inf"))                          # (B, <=k)
    best_idx = torch.zeros((len(queries), 0), dtype=torch.long, device=queries.device)
    for start in range(0, len(bank), block_rows):
        block = bank[start:start + block_rows].float()                                     # (b, d)
        sim = queries @ block.T                                                            # (B, b)
        idx = torch.arange(start, start + len(block), device=queries.device).expand(len(queries), -1)
        sim, idx = torch.cat([best_sim, sim], 1), torch.cat([best_idx, idx], 1)            # (B, <=k + b)
        best_sim, pick = sim.topk(min(k, sim.shape[1]), dim=1)
        best_idx = idx.gather(1, pick)
    return best_sim, best_idx


def vote(sim, labels, n_classes, temperature):
    """Neighbours' similarities (B, k) and labels (B, k) -> class probabilities (B, C): each neighbour's
    weight exp(sim / temperature), normalised over the k (shifted by the best for stability)."""
    weight = torch.exp((sim - sim[:, :1]) / temperature)                                   # (B, k)
    votes = torch.zeros(len(sim), n_classes, device=sim.device).scatter_add_(1, labels, weight)
    return votes / votes.sum(1, keepdim=True)


class Knn(FoldModel):
    block_rows = 8192          # bank rows per step of the search; bounds memory, not part of the model

    def __init__(self, spec):
        super().__init__()
        from neural.models import spec_params
        params = spec_params(spec)
        self.k, self.temperature = params.k, params.temperature
        width = spec.frame_dim + 3 * spec.text_dim                                         # W
        dim = min(params.dim, width) if params.dim > 0 else width                          # d
        self.register_buffer("mean", torch.zeros(width))                                   # (W,)
        self.register_buffer("projection", torch.eye(width, dim))                          # (W, d)
        self.register_buffer("fine_to_coarse", torch.zeros(spec.n_fine, dtype=torch.long))  # (C,)
        self.register_buffer("bank", torch.zeros(0, dim, dtype=torch.float16))             # (N_train, d)
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))              # (N_train,)
        self.n_fine, self.n_coarse = spec.n_fine, spec.n_coarse

    def size_from(self, tensors):
        """The bank's size is the fold's training rows, not the spec's: taken from the checkpoint."""
        for name in ("bank", "bank_labels"):
            if name in tensors:
                setattr(self, name, torch.zeros(tensors[name].shape, dtype=getattr(self, name).dtype))

    def embed(self, batch):
        """(B, d) unit vectors the bank is searched with."""
        x = representation(batch) - self.mean                                              # (B, W)
        return F.normalize(x @ self.projection, dim=1)                                     # (B, d)

    @torch.no_grad()
    def initialise(self, context):
        """Projection from the training rows' covariance (one pass, float64 sums), then the bank (a second pass)."""
        batches = ordered_batches(context.rows, context.batch_size)
        width = self.mean.shape[0]
        # sums in place into buffers made once: a new (W, W) float64 (29 MiB at W = 1920) per batch made glibc
        # keep them on its heap (its mmap threshold rises to the largest freed block), fragmenting it
        total, total_sq = torch.zeros(width, dtype=torch.float64), torch.zeros(width, width, dtype=torch.float64)
        product, n = torch.empty(width, width, dtype=torch.float64), 0
        for batch in loader(context.dataset, batches):
            x = representation(batch).double()                                             # (B, W)
            total += x.sum(0)
            total_sq += torch.mm(x.T, x, out=product)
            n += len(x)
        mean = total / n                                                                   # (W,)
        self.mean.copy_(mean.float())
        if self.projection.shape[1] < self.projection.shape[0]:                           # a PCA to d < W
            _, axes = torch.linalg.eigh(total_sq / n - torch.outer(mean, mean))           # ascending
            self.projection.copy_(axes[:, -self.projection.shape[1]:].flip(1).float())
        self.bank = torch.zeros(n, self.projection.shape[1], dtype=torch.float16)          # (N_train, d)
        self.bank_labels = torch.zeros(n, dtype=torch.long)                                # (N_train,)
        start = 0
        for batch in loader(context.dataset, batches):                                    # rows sorted
            self.bank[start:start + len(batch["rows"])] = self.embed(batch).half()
            self.bank_labels[start:start + len(batch["rows"])] = batch["label_fine"]
            start += len(batch["rows"])
        if (self.bank_labels < 0).any():
            raise ValueError("knn: every training row of the bank needs a label (label_fine >= 0)")
        self.fine_to_coarse.copy_(torch.as_tensor(context.dataset.fine_to_coarse, dtype=torch.long))

    @torch.no_grad()
    def forward(self, batch):
        """-> (log fine vote probabilities (B, C), log coarse vote probabilities (B, C1))."""
        with torch.autocast(self.bank.device.type, enabled=False):      # cosines in float32, never bf16
            sim, idx = top_k(self.embed(batch).float(), self.bank, self.k, self.block_rows)
            fine = vote(sim, self.bank_labels[idx], self.n_fine, self.temperature)         # (B, C)
            coarse = torch.zeros(len(fine), self.n_coarse, device=fine.device).index_add_(
                1, self.fine_to_coarse, fine)                                              # (B, C1)
        return (torch.log(fine * (1 - FLOOR * self.n_fine) + FLOOR),
                torch.log(coarse * (1 - FLOOR * self.n_coarse) + FLOOR))


ENTRY = ModelEntry("knn", Knn, FRAMES_AND_POOLED_TEXT,
                   "retrieval votes: the k nearest training videos (cosine on the PCA'd mean frame and "
                   "pooled text) vote for their classes, weighted by exp(similarity / temperature); "
                   "nothing trained", order=90, Params=KnnParams,
                   legacy=(("knn_k", "k"), ("knn_temperature", "temperature"), ("knn_dim", "dim")))

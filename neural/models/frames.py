"""frames: softmax regression on every frame (each frame an instance), the frame probabilities averaged
over a video's real frames; fitted exactly when the fold starts, not by the training loop.

Why: on real video of actors a model never saw (ucf14, bench/README.md "Real video, unseen actors"),
what generalises is a strongly L2-regularised linear probe, and training it on frames rather than on
the mean frame gives it 25 views of each video (grouped-CV mean-F1 0.967 against 0.963 for the
mean-frame logistic regression). The training loop's few AdamW epochs without an L2 term reach neither
optimum (the `linear` model, trained so on the mean frame, scores 0.830 there), so `initialise`
solves the convex problem

    min_W,b  mean over videos of (mean over its real frames of CE(W x_f + b, y))  +  l2 / 2 ||W||^2,
    l2 = 1 / (C * N_train)          (scikit-learn's C, counted in videos)

by full-batch L-BFGS on frames centred and divided by their RMS spread (fitted on the fold's training
rows, kept as buffers, as in linear.py), and freezes W and b. The loop then trains one scalar only,
the log temperature of the frame logits (calibration; the arg-max does not move).

Coarse logits are log of the fine probabilities summed per coarse class, so the two levels agree.
A large store is subsampled to at most MAX_FRAMES training frames (every k-th frame position).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from features import schema
from neural.data import loader, ordered_batches
from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import ensure_one

C = 0.3                  # grouped-CV on ucf14 (train part): 0.966 at 0.1, 0.967 at 0.3 and 1.0
MAX_FRAMES = 200_000     # training frames held for the L-BFGS fit (at most MAX_FRAMES x D float32)
LBFGS_STEPS = 100


def frame_probe_fit(frames, mask, labels, n_classes, l2, steps=LBFGS_STEPS):
    """frames (N, F, D), mask (N, F) bool, labels (N,) -> W (C, D), b (C,) minimising the mean over
    videos of the mean frame cross-entropy + l2 / 2 ||W||^2 (convex: L-BFGS reaches the optimum)."""
    weight = mask.float() / mask.sum(1, keepdim=True).clamp(min=1).float() / len(frames)     # (N, F)
    x = frames[mask].float()                                             # (M, D) real frames
    w, target = weight[mask], labels.unsqueeze(1).expand_as(mask)[mask]  # (M,), (M,)
    W = torch.zeros(n_classes, frames.shape[-1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = F.cross_entropy(x @ W.T + b, target, reduction="none")      # (M,)
        loss = (w * ce).sum() + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


class FrameProbe(FoldModel):
    def __init__(self, spec):
        super().__init__()
        d = spec.frame_dim
        self.register_buffer("mean", torch.zeros(d))                          # (D,)
        self.register_buffer("scale", torch.ones(()))                         # 1 / RMS spread of the frames
        self.register_buffer("fine_to_coarse", torch.zeros(spec.n_fine, dtype=torch.long))   # (C,)
        self.n_coarse = spec.n_coarse
        self.probe = nn.Linear(d, spec.n_fine)
        self.probe.requires_grad_(False)                                     # solved in initialise
        self.log_temperature = nn.Parameter(torch.zeros(()))                # what the loop trains

    @torch.no_grad()
    def initialise(self, context):
        """Frame statistics and the L2-optimal probe on the fold's training rows (see the module doc)."""
        rows = context.rows
        n_frames = context.dataset.reader.h5[schema.FRAME_EMB].shape[1]
        stride = max(1, math.ceil(len(rows) * n_frames / MAX_FRAMES))
        frames, masks, labels = [], [], []
        for batch in loader(context.dataset, ordered_batches(rows, context.batch_size)):
            frames.append(batch[schema.FRAME_EMB][:, ::stride])                             # (B, F', D)
            masks.append(ensure_one(batch[schema.FRAME_MASK])[:, ::stride])                 # (B, F')
            labels.append(batch["label_fine"])
        width = max(f.shape[1] for f in frames)                  # batches are trimmed to their longest video
        frames = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f in frames])       # (N, F', D)
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])                # (N, F')
        real = frames[mask]                                                                # (M, D)
        mean = (real.sum(0, dtype=torch.float64) / len(real)).float()                      # (D,)
        spread = ((real - mean) ** 2).sum(dtype=torch.float64) / real.numel()             # mean variance
        scale = spread.clamp(min=1e-12).rsqrt().float()
        W, b = frame_probe_fit((frames - mean) * scale, mask, torch.cat(labels), self.probe.out_features,
                               1.0 / (C * len(rows)))
        self.mean.copy_(mean)
        self.scale.copy_(scale)
        self.probe.weight.copy_(W)
        self.probe.bias.copy_(b)
        self.fine_to_coarse.copy_(torch.as_tensor(context.dataset.fine_to_coarse))

    def forward(self, batch):
        mask = ensure_one(batch[schema.FRAME_MASK])                                   # (B, F)
        x = (batch[schema.FRAME_EMB].float() - self.mean) * self.scale                  # (B, F, D)
        frame_logp = F.log_softmax(self.probe(x) * self.log_temperature.exp(), -1)     # (B, F, C)
        weight = mask.float() / mask.sum(1, keepdim=True).float()                      # (B, F)
        fine = torch.logsumexp(frame_logp + weight.clamp(min=1e-30).log().unsqueeze(-1), dim=1)  # (B, C) log mean p
        return fine, self._coarse(fine)

    def _coarse(self, fine):
        """(B, C) fine log probabilities -> (B, C1) log of their sums per coarse class."""
        p = fine.exp()                                                                 # (B, C)
        summed = torch.zeros(len(p), self.n_coarse, dtype=p.dtype, device=p.device)
        summed.index_add_(1, self.fine_to_coarse, p)
        return summed.clamp(min=1e-30).log()


ENTRY = ModelEntry("frames", FrameProbe, (schema.FRAME_EMB, schema.FRAME_MASK),
                   "softmax regression on every frame (L2-optimal, solved by L-BFGS when the fold starts), "
                   "frame probabilities averaged")

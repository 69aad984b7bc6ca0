"""frames: softmax regression on every frame (each frame an instance), the frame probabilities averaged
over a video's real frames; fitted exactly when the fold starts, not by the training loop.

Why: on real video of actors a model never saw (ucf14, docs/results.md: heldout and ucf14),
what generalises is a strongly L2-regularised linear probe, and training it on frames rather than on
the mean frame gives it 25 views of each video (grouped-CV mean-F1 0.967 against 0.963 for the
mean-frame logistic regression). The training loop's few AdamW epochs without an L2 term reach neither
optimum (the `linear` model, trained so on the mean frame, scores 0.830 there), so `initialise`
solves the convex problem

    min_W,b  mean over videos of (mean over its real frames of CE(W x_f + b, y))  +  l2 / 2 ||W||^2,
    l2 = 1 / (C * N_train)          (scikit-learn's C, counted in videos; --param frames.C)

by full-batch L-BFGS on frames centred and divided by their RMS spread (fitted on the fold's training
rows, kept as buffers, as in linear.py), and freezes W and b. The loop then trains one scalar only,
the log temperature of the frame logits (calibration; the arg-max does not move).

A student (train-neural --teacher) adds its fold's confident pseudo-labelled videos to that objective,
each weighted --pseudo-weight against a labelled video, the teacher's probabilities as soft targets
(cross-entropy against them; not re-tempered: at --pseudo-temperature 2 the grouped-fold OOF on ucf14
fell from 0.944 to 0.923, at 1 it rose to 0.947). The L2 term stays scaled by the labelled videos.

Coarse logits are log of the fine probabilities summed per coarse class, so the two levels agree.
A large store is subsampled to at most MAX_FRAMES training frames (every k-th frame position).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import schema
from neural.data import loader, ordered_batches
from neural.models.base import FoldModel, ModelEntry, param
from neural.models.blocks import ensure_one

MAX_FRAMES = 200_000     # training frames held for the L-BFGS fit (at most MAX_FRAMES x D float32)
LBFGS_STEPS = 100


@dataclass
class FramesParams:              # C: grouped-CV on ucf14 (train part): 0.966 at 0.1, 0.967 at 0.3 and 1.0
    C: float = param(0.3, "inverse L2 strength of the probe, counted in videos (scikit-learn's C)")

    def check(self):
        if self.C <= 0:
            raise ValueError(f"frames.C must be > 0, got {self.C}")


def frame_probe_fit(frames, mask, targets, n_classes, l2, video_weight=None, steps=LBFGS_STEPS):
    """frames (N, F, D), mask (N, F) bool, targets (N,) class indices or (N, C) probabilities,
    video_weight (N,) (default 1 / N each) -> W (C, D), b (C,) minimising the weighted sum over videos of
    the mean frame cross-entropy + l2 / 2 ||W||^2 (convex: L-BFGS reaches the optimum)."""
    per_video = mask.float() / mask.sum(1, keepdim=True).clamp(min=1).float()                # (N, F)
    weight = per_video / len(frames) if video_weight is None else per_video * video_weight[:, None]
    x = frames[mask].float()                                             # (M, D) real frames
    per_frame = targets.unsqueeze(1).expand(*mask.shape, *targets.shape[1:])   # (N, F) or (N, F, C)
    w, target = weight[mask], per_frame[mask]                            # (M,), (M,) or (M, C)
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
        from neural.models import spec_params
        self.C = spec_params(spec).C
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
        """Frame statistics and the L2-optimal probe on the fold's training rows (see the module doc),
        plus, for a student, its confident pseudo-labelled rows with the teacher's probabilities as targets."""
        rows, pseudo = context.rows, context.pseudo
        pseudo_rows = pseudo.rows if pseudo is not None else []
        n_frames = context.dataset.reader.h5[schema.FRAME_EMB].shape[1]
        stride = max(1, math.ceil((len(rows) + len(pseudo_rows)) * n_frames / MAX_FRAMES))
        frames, mask, targets = self._read(context.dataset, rows, context.batch_size, stride, "label_fine")
        video_weight = None                                                  # labelled rows only: 1 / N each
        if len(pseudo_rows):
            p_frames, p_mask, soft = self._read(pseudo.dataset, pseudo_rows, context.batch_size, stride,
                                                "soft_target")                            # soft (P, C)
            width = max(frames.shape[1], p_frames.shape[1])
            frames = torch.cat([F.pad(frames, (0, 0, 0, width - frames.shape[1])),
                                F.pad(p_frames, (0, 0, 0, width - p_frames.shape[1]))])
            mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])), F.pad(p_mask, (0, width - p_mask.shape[1]))])
            targets = torch.cat([F.one_hot(targets, self.probe.out_features).float(), soft])   # (N+P, C)
            video_weight = torch.cat([torch.full((len(rows),), 1.0 / len(rows)),          # a labelled video: 1,
                                      torch.full((len(pseudo_rows),), pseudo.options.pseudo_weight / len(rows))])
        real = frames[mask]                                                                # (M, D)
        mean = (real.sum(0, dtype=torch.float64) / len(real)).float()                      # (D,)
        spread = ((real - mean) ** 2).sum(dtype=torch.float64) / real.numel()             # mean variance
        scale = spread.clamp(min=1e-12).rsqrt().float()
        W, b = frame_probe_fit((frames - mean) * scale, mask, targets, self.probe.out_features,
                               1.0 / (self.C * len(rows)), video_weight)
        self.mean.copy_(mean)
        self.scale.copy_(scale)
        self.probe.weight.copy_(W)
        self.probe.bias.copy_(b)
        self.fine_to_coarse.copy_(torch.as_tensor(context.dataset.fine_to_coarse))

    @staticmethod
    def _read(dataset, rows, batch_size, stride, target):
        """(frames (N, F', D) every stride-th position, mask (N, F'), batch[target] stacked) of `rows`."""
        frames, masks, targets = [], [], []
        for batch in loader(dataset, ordered_batches(rows, batch_size)):
            frames.append(batch[schema.FRAME_EMB][:, ::stride])                             # (B, F', D)
            masks.append(ensure_one(batch[schema.FRAME_MASK])[:, ::stride])                 # (B, F')
            targets.append(batch[target])
        width = max(f.shape[1] for f in frames)                  # batches are trimmed to their longest video
        frames = torch.cat([F.pad(f, (0, 0, 0, width - f.shape[1])) for f in frames])       # (N, F', D)
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])                # (N, F')
        return frames, mask, torch.cat(targets)

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
                   "frame probabilities averaged", order=70, default=False,
                   Params=FramesParams)

"""names: zero-shot scores, the cosine of each pooled text field with each class name's embedding
(features/class_names.py), times a learned temperature per field and level. It has no per-class
weight, so a class with no training video scores like one with many: the stack's evidence for the
rarest classes. The name vectors are buffers: set from CACHE_DIR/class_names.h5 when training
(`initialise`), restored with the checkpoint's tensors."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core import schema
from neural.models.base import FoldModel, ModelEntry
from neural.models.blocks import POOLED_TEXT


class NamePrior(FoldModel):
    def __init__(self, spec):
        super().__init__()
        self.register_buffer("fine_names", torch.zeros(spec.n_fine, spec.text_dim))       # (C, Dt)
        self.register_buffer("coarse_names", torch.zeros(spec.n_coarse, spec.text_dim))   # (C1, Dt)
        self.log_scale = nn.Parameter(torch.full((2, len(schema.TEXT_FIELDS)), math.log(20.0)))  # (level, field)

    def initialise(self, context):
        names = context.class_names
        self.fine_names.copy_(F.normalize(torch.as_tensor(names.fine_emb, dtype=torch.float32), dim=-1))
        self.coarse_names.copy_(F.normalize(torch.as_tensor(names.coarse_emb, dtype=torch.float32), dim=-1))

    def forward(self, batch):
        text = F.normalize(batch[schema.TEXT_POOLED].float(), dim=-1)        # (B, 3, Dt)
        weight = self.log_scale.exp()                                        # (2, 3)
        mask = batch[schema.TEXT_FIELD_MASK].float()                         # (B, 3)
        fine = torch.einsum("bfd,cd,bf->bc", text, self.fine_names, mask * weight[0])
        coarse = torch.einsum("bfd,cd,bf->bc", text, self.coarse_names, mask * weight[1])
        return fine, coarse


ENTRY = ModelEntry("names", NamePrior, POOLED_TEXT,
                   "zero-shot: cosine of each pooled text field with each class name's vector, a learned "
                   "temperature per field; only when the cache has class_names.h5",
                   needs_class_names=True, order=80)

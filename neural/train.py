"""Training of one fold model: one loop, read top to bottom (multi-task loss, EMA, FGM, R-Drop)."""
import itertools
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core import schema
from neural.data import loader, ordered_batches, shuffled_batches, to_device
from neural.models import build_model

LABEL_KEYS = ("rows", "label_fine", "label_coarse")
TEXT_KEYS = (schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK, schema.TEXT_POOLED, schema.TEXT_FIELD_MASK, schema.TEXT_LEN)
TEXT_MASKS = (schema.TEXT_TOKEN_MASK, schema.TEXT_FIELD_MASK)


def autocast(device):
    """bf16 autocast on GPU (no loss scaling needed); plain float32 on CPU, which keeps runs bit-exact.
    `device` is "cpu", "cuda" or, for a torchrun rank, "cuda:<local rank>"."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def class_weights(train_labels, n_classes, beta):
    """Class-balanced weights (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), mean 1 over the items."""
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)        # (C,)
    w = np.where(counts > 0, (1 - beta) / (1 - beta ** np.maximum(counts, 1)), 0.0)
    w *= len(train_labels) / (w * counts).sum()
    return torch.tensor(w, dtype=torch.float32)


def ema_model(model, decay):
    """An exponential moving average of `model`'s weights and floating-point buffers (torch's AveragedModel;
    integer buffers are copied): `ema.update_parameters(model)` after each step, predict with `ema.module`.

    Not torch's get_ema_multi_avg_fn: that averages with `decay` from the first update on, so after a short
    run (tens of steps at decay 0.995) the average is still mostly the first steps' weights. Here the decay
    warms up, min(decay, (1 + n) / (10 + n)) at update n, as this project's EMA always did
    (tests/test_neural_ema_schedule.py checks the weights equal that formula's, bit for bit)."""
    from torch.optim.swa_utils import AveragedModel
    ema = AveragedModel(model, multi_avg_fn=_warmed_up_ema(decay), use_buffers=True)
    ema.update_parameters(model)           # update 0 copies the weights: the average starts at them
    for p in ema.module.parameters():
        p.requires_grad_(False)
    return ema


def _warmed_up_ema(decay):
    """AveragedModel's multi_avg_fn: shadow <- d * shadow + (1 - d) * live, d = min(decay, (1 + n) / (10 + n))."""
    @torch.no_grad()
    def update(shadows, lives, n_averaged):
        n = int(n_averaged)                 # updates so far, counting update 0's copy
        d = min(decay, (1 + n) / (10 + n))
        for shadow, live in zip(shadows, lives):
            if shadow.is_floating_point():
                shadow.mul_(d).add_(live, alpha=1 - d)
            else:
                shadow.copy_(live)
    return update


def task_loss(model, batch, weights, options):
    """Fine cross-entropy + coarse_weight * coarse cross-entropy; with R-Drop, two dropout passes
    averaged plus alpha * the symmetric KL between their fine distributions."""
    def one_pass():
        fine, coarse = model(batch)                                    # (B, C), (B, C1)
        loss = F.cross_entropy(fine.float(), batch["label_fine"], weight=weights,
                               label_smoothing=options.label_smoothing)
        loss = loss + options.coarse_weight * F.cross_entropy(
            coarse.float(), batch["label_coarse"], label_smoothing=options.label_smoothing)
        return loss, fine.float()

    loss, fine = one_pass()
    if not options.rdrop:
        return loss
    loss2, fine2 = one_pass()
    logp, logq = F.log_softmax(fine, -1), F.log_softmax(fine2, -1)
    kl = 0.5 * (F.kl_div(logp, logq, log_target=True, reduction="batchmean")
                + F.kl_div(logq, logp, log_target=True, reduction="batchmean"))
    return 0.5 * (loss + loss2) + options.rdrop_alpha * kl


def distill_loss(model, batch, temperature):
    """T^2 * KL(teacher_T || student_T) on the fine head, mean over the unlabelled rows: the teacher's
    probabilities batch["soft_target"] (B, C) re-tempered as softmax(log p / T), the student's as
    softmax(logits / T) (Hinton et al. 2015; T^2 keeps the gradient scale independent of T)."""
    fine, _ = model(batch)                                             # (B, C)
    teacher = torch.softmax(batch["soft_target"].clamp(min=1e-6).log() / temperature, dim=-1)
    student = F.log_softmax(fine.float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, reduction="batchmean")


def _frame_key(name):
    """Frames and what extract aggregated from them (agg/*) form the video modality."""
    return name in (schema.FRAME_EMB, schema.FRAME_MASK) or name.startswith(schema.AGG_GROUP + "/")


def drop_modality(batch, share, generator):
    """A copy of `batch` in which each row with text and frames, with probability `share`, loses one of the
    two (even odds): its values zeroed, its masks False. A batch that carries one modality is returned as
    is. Draws come from `generator` (CPU), two per row, so a seeded fold draws the same drops again."""
    text = [k for k in batch if k in TEXT_KEYS]
    frames = [k for k in batch if _frame_key(k)]
    if not share or not text or not frames:
        return batch
    n = len(batch[text[0]])
    has_text = torch.zeros(n, dtype=torch.bool)
    for key in (k for k in TEXT_MASKS if k in batch):
        has_text |= batch[key].any(dim=1).cpu()
    has_frames = (batch[schema.FRAME_MASK].any(dim=1).cpu() if schema.FRAME_MASK in batch
                  else torch.ones(n, dtype=torch.bool))                  # aggregates only: every row has them
    dropped = (torch.rand(n, generator=generator) < share) & has_text & has_frames             # (B,)
    text_side = torch.rand(n, generator=generator) < 0.5                                        # (B,)
    out = dict(batch)
    for keys, rows in ((text, dropped & text_side), (frames, dropped & ~text_side)):
        for key in keys:
            value = out[key]
            keep = (~rows).to(value.device).view(-1, *[1] * (value.dim() - 1))
            out[key] = value & keep if value.dtype == torch.bool else value * keep.to(value.dtype)
    return out


def fgm_inputs(batch, grads, eps):
    """Inputs moved along their loss gradient by eps times each row's norm (scale-free FGM)."""
    adv = dict(batch)
    for name, g in grads.items():
        x = batch[name].detach()
        dims = tuple(range(1, x.dim()))
        g_norm = g.norm(dim=dims, keepdim=True).clamp(min=1e-12)
        adv[name] = x + eps * x.norm(dim=dims, keepdim=True) * g / g_norm
    return adv


def schedule(total_steps, warmup_frac):
    """LambdaLR's factor of step s (0-based): a linear warm-up (s + 1) / warm over the first warm steps, then
    cosine decay to zero. Not transformers' get_cosine_schedule_with_warmup: its warm-up is s / warm, so its
    first step has learning rate 0 and every warm-up step is one behind this one
    (tests/test_neural_ema_schedule.py shows where the two differ; the cosine part is the same)."""
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    return factor


def train_step(model, batch, weights, options, optimizer, device, unlabelled=None):
    """One optimiser step on a labelled batch, plus pseudo_weight * distill_loss on `unlabelled` (a batch
    with soft targets) when given."""
    optimizer.zero_grad(set_to_none=True)
    float_inputs = [k for k, v in batch.items() if k not in LABEL_KEYS and v.is_floating_point()]
    if options.fgm:
        for name in float_inputs:
            batch[name].requires_grad_(True)
    with autocast(device):
        loss = task_loss(model, batch, weights, options)
        if unlabelled is not None:
            loss = loss + options.pseudo_weight * distill_loss(model, unlabelled, options.pseudo_temperature)
    loss.backward()
    if options.fgm:
        grads = {n: batch[n].grad for n in float_inputs if batch[n].grad is not None}
        with autocast(device):
            adv_loss = task_loss(model, fgm_inputs(batch, grads, options.fgm_eps), weights, options)
        adv_loss.backward()                                             # gradients accumulate
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def fit_fold(spec, context, options, seed, device, desc="fold"):
    """Train one model (ModelSpec) on the fold `context` (FitContext: the dataset and the store rows it
    trains on, and what else it learns from). -> (model to predict with, info dict).
    `context.codebook` and `context.class_names` initialise the models that need them;
    `context.pretrained` (neural.pretrain.Pretrained) then replaces every weight but the heads.
    `context.pseudo` (neural.pseudo.PseudoLabels): each step of the first options.epochs also distils one batch
    of the teacher's pseudo-labels (options.pseudo_modality_drop of them without their text or their
    frames, drop_modality); then options.pseudo_finetune_epochs on labelled rows only (one LR
    schedule over all of them). Without it, nothing below draws or computes anything more.

    Everything random is drawn from `seed`, so a fold trains identically whether or not the folds
    before it ran in the same process (what makes resuming exact)."""
    dataset, train_rows, pretrained, pseudo = context.dataset, context.rows, context.pretrained, context.pseudo
    torch.manual_seed(seed)
    model = build_model(spec)
    start = time.perf_counter()
    model.initialise(context)
    if pretrained is not None:                  # every fold starts from the self-supervised weights
        pretrained.load_into(model)
    model = model.to(device)
    if not any(p.requires_grad for p in model.parameters()):     # nothing to train (knn): initialised is final
        return model.eval(), {"epoch_loss": [], "seconds_per_epoch": [time.perf_counter() - start]}
    labels = dataset.labels[train_rows]
    weights = class_weights(labels, spec.n_fine, options.balance_beta).to(device) \
        if options.class_balanced else None
    n_batches = math.ceil(len(train_rows) / options.batch_size)
    epochs = options.epochs + (options.pseudo_finetune_epochs if pseudo is not None else 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, schedule(epochs * n_batches, options.warmup_frac))
    ema = ema_model(model, options.ema_decay) if options.ema else None
    info = {"epoch_loss": [], "seconds_per_epoch": []}
    if pseudo is not None:
        info["pseudo"] = pseudo.info()
    bar = tqdm(total=epochs * n_batches, desc=desc, leave=False, mininterval=2)
    drops = torch.Generator().manual_seed(seed)               # which pseudo-labelled rows lose a modality
    for epoch in range(epochs):
        model.train()
        start, losses = time.perf_counter(), []
        batches = shuffled_batches(train_rows, options.batch_size, seed * 1000 + epoch)
        distil = pseudo is not None and len(pseudo) and epoch < options.epochs
        extra = loader(pseudo.dataset, pseudo.batches(seed, epoch, len(batches)), options.num_workers) \
            if distil else itertools.repeat(None)
        for batch, unlabelled in zip(loader(dataset, batches, options.num_workers), extra):
            if unlabelled is not None:
                unlabelled = drop_modality(to_device(unlabelled, device), options.pseudo_modality_drop, drops)
            losses.append(train_step(model, to_device(batch, device), weights, options, optimizer, device,
                                     unlabelled))
            scheduler.step()
            if ema:
                ema.update_parameters(model)
            bar.update(1)
        info["epoch_loss"].append(float(np.mean(losses)))
        info["seconds_per_epoch"].append(time.perf_counter() - start)
        bar.set_postfix(loss=f"{info['epoch_loss'][-1]:.3f}")
    bar.close()
    final = ema.module if ema else model
    return final.eval(), info


@torch.no_grad()
def predict_batches(models, dataset, rows, batch_size, device, num_workers=0):
    """Yield (rows (B,) sorted, proba (B, C) float32): the softmax averaged over `models` (eval mode)."""
    for batch in loader(dataset, ordered_batches(rows, batch_size), num_workers):
        batch = to_device(batch, device)
        with autocast(device):
            proba = sum(torch.softmax(m(batch)[0].float(), dim=-1) for m in models) / len(models)
        yield batch["rows"].cpu().numpy(), proba.cpu().numpy().astype(np.float32)


def predict_rows(models, dataset, rows, batch_size, device, num_workers=0):
    """(len(rows), C) probabilities, in sorted row order."""
    parts = [p for _, p in predict_batches(models, dataset, rows, batch_size, device, num_workers)]
    return np.concatenate(parts)

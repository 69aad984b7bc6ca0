"""Self-supervised pretraining of the token/frame models (single, dual, cross) on the cached features.

No labels: every store in the cache (labelled, unlabelled, test) is read, its label_fine never. The
objectives, each weighted by an option (NeuralOptions.pretrain_*); one whose inputs no store has (a
frames-only cache has no text) is skipped, and said so:
  mfm  masked frame modelling: ~15% of the real frames are replaced by a learned mask vector (frame_mask
       stays True); each masked frame's video state, projected to frame_dim, must pick its own frame
       embedding among all the batch's masked frames (InfoNCE, temperature 0.07)
  mtm  masked token-state modelling: the same on text_tokens (the frozen-encoder analogue of MLM)
  vtm  video-text matching: half the pairs get another video's frames (a roll within the batch); a small
       head predicts from the pooled state whether text and frames belong together
  vtc  video-text contrastive alignment: InfoNCE both ways between the pooled text and the pooled video
       states, learned temperature (from 0.07)
The heads of these objectives (PretrainHeads) are not part of the fold model. A model can be pretrained
when it has encode(batch) -> (text (B, T, H), text_mask, video (B, F, H), video_mask), its states before
pooling, and pool(...) -> (B, H); its forward is heads(pool(*encode(batch))).

Saved once per model, then every fold starts from it (neural.train.fit_fold):
    RUN_DIR/pretrain/<model>.safetensors         the fold model's state dict less its heads (heads.*)
    RUN_DIR/pretrain/<model>.json                spec, options, the stores read (split, rows, config),
                                                 objectives used and skipped, steps, losses per epoch
    RUN_DIR/pretrain/<model>.resume.safetensors  while it runs: model, heads and optimizer state after the
                                                 last finished epoch (epoch and record in its metadata)
Everything random is seeded per epoch, so a killed pretraining resumes from its last finished epoch to
the same final weights. Fold checkpoints hold the whole model: nothing at predict time reads these files.
"""
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from core import schema
from core.records import atomic_path, options_diff, read_json, write_json
from features.store import feature_identity
from neural.checkpoint import read_tensors, tensor_mismatch
from neural.data import StoreBatches, loader, shuffled_batches, to_device
from neural.models import build_model, model_entry, model_inputs, registry
from neural.models.blocks import masked_mean
from neural.outputs import RUN_FILE, RunError, read_run
from neural.train import autocast, schedule

FORMAT = "shortvideo-pretrain"
PRETRAIN_DIR = "pretrain"              # inside RUN_DIR
HEAD_PREFIX = "heads."                 # the classification heads: not pretrained, not saved
OBJECTIVES = {"mfm": ("frames",), "mtm": ("text",), "vtm": ("text", "frames"), "vtc": ("text", "frames")}
TEMPERATURE = 0.07
POSITION_BUCKET = 64                   # masked positions per batch are padded to a multiple of this
PROBE_ROWS = 2048                      # rows per store read to learn whether it has text tokens / frames


class PretrainError(RunError):
    """Pretraining that cannot run or be resumed as asked, or pretrained weights that do not fit."""


def pretrainable(name):
    """Whether model `name` has encode(batch) -> its sequence states (single, dual, cross)."""
    return callable(getattr(model_entry(name).cls, "encode", None))


def pretrain_paths(run_dir, model):
    """-> (tensors, record, resume state) paths of one model's pretraining."""
    d = Path(run_dir) / PRETRAIN_DIR
    return d / f"{model}.safetensors", d / f"{model}.json", d / f"{model}.resume.safetensors"


@dataclass
class Pretrained:
    """A model's pretrained state (its state dict less the heads), the file it came from and its record."""
    path: Path
    tensors: dict
    record: dict

    def load_into(self, model):
        """Replace every weight but the heads; the tensors must be exactly the model's non-head state."""
        body = {n: t for n, t in model.state_dict().items() if not n.startswith(HEAD_PREFIX)}
        parts = tensor_mismatch(body, self.tensors, source="the model has")
        if parts:
            raise PretrainError(f"{self.path}: pretrained tensors do not fit the fold model ({'; '.join(parts)})")
        model.load_state_dict(self.tensors, strict=False)
        return model

    def summary(self):
        """What a run records about it (run.json, predictions.h5): the file, the stores and their rows."""
        return summarise(self.record)


def summarise(record):
    """The summary of a pretraining record (<model>.json) that run.json and predictions.h5 keep."""
    return {"file": f"{PRETRAIN_DIR}/{record['model']}.safetensors", "epochs": record["epochs"],
            "objectives": record["objectives"], "skipped": record["skipped"],
            "stores": {split: s["rows"] for split, s in record["stores"].items()}}


class PretrainHeads(nn.Module):
    """The layers only pretraining uses: mask vectors, the masked-state predictors, the match head, the
    contrastive projections and temperature. Never part of a fold model."""

    def __init__(self, spec):
        super().__init__()
        h = spec.hidden
        self.frame_mask = nn.Parameter(torch.zeros(spec.frame_dim))       # (D,) input of a masked frame
        self.token_mask = nn.Parameter(torch.zeros(spec.text_dim))        # (Dt,) input of a masked token
        self.frame_head = _predictor(h, spec.frame_dim)                   # (M, H) -> (M, D)
        self.token_head = _predictor(h, spec.text_dim)                    # (M, H) -> (M, Dt)
        self.match = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
        self.text_proj, self.video_proj = nn.Linear(h, h), nn.Linear(h, h)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / TEMPERATURE)))


def _predictor(hidden, d_out):
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, d_out))


def info_nce(pred, target, scale, real=None):
    """pred (M, E), target (M, E): row i should pick target i among the M (scaled cosine, cross-entropy).
    real (M,) bool: only those rows are pairs; the others are padding, neither asked nor chosen among, so
    the loss is that of the real rows alone."""
    logits = scale * F.normalize(pred.float(), dim=-1) @ F.normalize(target.float(), dim=-1).T    # (M, M)
    labels = torch.arange(len(pred), device=logits.device)
    if real is None:
        return F.cross_entropy(logits, labels)
    logits = logits.masked_fill(~real.unsqueeze(0), float("-inf"))
    return F.cross_entropy(logits[real], labels[real])


def padded_positions(at, bucket):
    """(B, L) or (B,) chosen positions -> (flat indices (M',), real (M',) bool): the M chosen positions in
    row-major order, padded with position 0 up to a multiple of `bucket`. The number chosen varies per batch; tensors
    of as many sizes fragment the C heap, which then grows with every step (pretraining +6.7 KB per video
    per epoch); padded to a few sizes it stays flat."""
    flat = torch.nonzero(at.flatten()).squeeze(1)                                            # (M,)
    size = -(-len(flat) // bucket) * bucket
    real = torch.zeros(size, dtype=torch.bool, device=at.device)
    real[: len(flat)] = True
    return torch.cat([flat, flat.new_zeros(size - len(flat))]), real


def masked_state_loss(head, states, targets, at):
    """InfoNCE between the predicted and the true inputs at the chosen positions at (B, L):
    states (B, L, H), targets (B, L, D)."""
    index, real = padded_positions(at, POSITION_BUCKET)
    pred = head(states.flatten(0, 1)[index])                                                  # (M', D)
    return info_nce(pred, targets.flatten(0, 1)[index], 1 / TEMPERATURE, real)


def mask_positions(mask, ratio, generator):
    """(B, L) real positions -> (B, L) those replaced by the mask vector, each with probability `ratio`."""
    draw = torch.rand(mask.shape, generator=generator) < ratio
    return draw.to(mask.device) & mask


def match_loss(model, heads, batch, both, generator):
    """Video-text matching over the rows with text and frames (both (B,) bool, at least two): half of them
    get the frames of the next such row; the match head tells which kept their own. The pairs fill all B
    rows (the others pad, their own frames, left out of the loss), so the encoder's tensors keep the
    batch's size whatever n is (see padded_positions)."""
    rows, real = padded_positions(both, len(both))                          # (B,): n real, then padding
    n, size = int(real.sum()), len(both)
    swapped = torch.zeros(size, dtype=torch.bool)
    swapped[torch.randperm(n, generator=generator)[: n // 2]] = True
    swapped = swapped.to(rows.device)
    other = torch.cat([torch.roll(torch.arange(n, device=rows.device), 1), torch.arange(n, size, device=rows.device)])
    pairs = {k: v[rows] for k, v in batch.items()}
    for key in (schema.FRAME_EMB, schema.FRAME_MASK):
        x = pairs[key]
        pairs[key] = torch.where(swapped.view(-1, *[1] * (x.dim() - 1)), x[other], x)
    logit = heads.match(model.pool(*model.encode(pairs))).squeeze(-1)       # (B,)
    return F.binary_cross_entropy_with_logits(logit[:n].float(), (~swapped[:n]).float())


def batch_losses(model, heads, batch, weights, ratio, generator):
    """{objective: loss} of one batch for the objectives in `weights`; one the batch cannot serve (no
    position masked, fewer than two videos with text and frames) is left out of it."""
    inputs, chosen = dict(batch), {}
    for name, values, mask_key, vector in (("mfm", schema.FRAME_EMB, schema.FRAME_MASK, heads.frame_mask),
                                           ("mtm", schema.TEXT_TOKENS, schema.TEXT_TOKEN_MASK, heads.token_mask)):
        if name in weights:
            chosen[name] = mask_positions(batch[mask_key], ratio, generator)                   # (B, L)
            inputs[values] = torch.where(chosen[name].unsqueeze(-1), vector.to(batch[values].dtype), batch[values])
    text, text_mask, video, video_mask = model.encode(inputs)
    losses = {}
    if "mfm" in chosen and chosen["mfm"].sum() >= 2:
        losses["mfm"] = masked_state_loss(heads.frame_head, video, batch[schema.FRAME_EMB], chosen["mfm"])
    if "mtm" in chosen and chosen["mtm"].sum() >= 2:
        losses["mtm"] = masked_state_loss(heads.token_head, text, batch[schema.TEXT_TOKENS], chosen["mtm"])
    both = batch[schema.TEXT_TOKEN_MASK].any(1) & batch[schema.FRAME_MASK].any(1)             # (B,)
    if "vtc" in weights and both.sum() >= 2:
        t = heads.text_proj(masked_mean(text, text_mask)[both])                                 # (n, H)
        v = heads.video_proj(masked_mean(video, video_mask)[both])                              # (n, H)
        scale = heads.logit_scale.exp().clamp(max=100)
        losses["vtc"] = 0.5 * (info_nce(t, v, scale) + info_nce(v, t, scale))
    if "vtm" in weights and both.sum() >= 2:
        losses["vtm"] = match_loss(model, heads, batch, both, generator)
    return losses


class Stores(Dataset):
    """item (store index, rows) -> that store's batch (neural.data.StoreBatches, no labels)."""

    def __init__(self, datasets):
        self.datasets = datasets

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, item):
        i, rows = item
        return self.datasets[i][rows]


def epoch_batches(sizes, batch_size, seed):
    """[(store index, rows), ...]: each store's rows shuffled into batches (a batch reads one store), the
    batches of every store interleaved in a seeded order."""
    plan = [(i, rows) for i, n in enumerate(sizes) for rows in shuffled_batches(np.arange(n), batch_size, seed + i)]
    return [plan[j] for j in np.random.default_rng(seed).permutation(len(plan))]


def check_stores(spec, readers):
    """Every store must have the labelled store's identity (its config, where the data came from left
    out) and fit the model's inputs (frame and text widths, at most its frames)."""
    first = next(iter(readers.values()))
    base = feature_identity(first.config)
    for r in readers.values():
        model_inputs(spec.model, r)
        diff = options_diff(base, feature_identity(r.config))
        if diff:
            raise PretrainError(f"{r.path}: field 'config' differs from {first.path.name}'s ({diff}); pretraining "
                                "never mixes stores of other encoders or options")
        n_frames, frame_dim = r.h5[schema.FRAME_EMB].shape[1:]
        text_dim = r.h5[schema.TEXT_TOKENS].shape[-1]
        if frame_dim != spec.frame_dim or text_dim != spec.text_dim or n_frames > spec.n_frames:
            raise PretrainError(f"{r.path}: fields '{schema.FRAME_EMB}' / '{schema.TEXT_TOKENS}' have "
                                f"{n_frames} frames of {frame_dim} and tokens of {text_dim}; the model takes at "
                                f"most {spec.n_frames} frames of {spec.frame_dim} and tokens of {spec.text_dim}")


def modalities(readers):
    """{"text": bool, "frames": bool}: whether any store has a real text token / frame, judged on up to
    PROBE_ROWS rows of each, evenly spaced (a frames-only cache has every token masked)."""
    found = {"text": False, "frames": False}
    for r in readers.values():
        rows = np.unique(np.linspace(0, len(r) - 1, min(len(r), PROBE_ROWS)).astype(np.int64))
        found["text"] |= bool(r.read(schema.TEXT_TOKEN_MASK, rows).any())
        found["frames"] |= bool(r.read(schema.FRAME_MASK, rows).any())
    return found


def choose_objectives(options, present):
    """-> ({objective: weight} to train, {objective: why it is skipped})."""
    used, skipped = {}, {}
    for name, needs in OBJECTIVES.items():
        weight = float(getattr(options, f"pretrain_{name}"))
        absent = [m for m in needs if not present[m]]
        if weight <= 0:
            skipped[name] = "weight 0"
        elif absent:
            skipped[name] = f"no store has {' or '.join(absent)}"
        else:
            used[name] = weight
    if not used:
        raise PretrainError(f"no pretraining objective can run ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return used, skipped


@dataclass
class PretrainLoop:
    """What every pretraining epoch uses: the model and its objective heads, their optimizer, the learning
    rate schedule (lr_at(step) scales options.lr), the stores read, each objective's weight, the device
    and the progress bar."""
    model: nn.Module
    heads: nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: object                     # step -> LR factor
    stores: Dataset
    weights: dict                     # {objective: weight}
    options: object                   # NeuralOptions
    device: str
    bar: object                       # tqdm


def run_epoch(loop, plan, first_step, seed):
    """One pass over `plan` (its first batch is global step `first_step`); every randomness (dropout,
    masks, swaps) drawn from `seed`. -> {objective: mean loss} plus "total" (the weighted sum)."""
    model, heads, optimizer, weights, options, device = (loop.model, loop.heads, loop.optimizer, loop.weights,
                                                         loop.options, loop.device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    heads.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sums = {}
    for i, batch in enumerate(loader(loop.stores, plan, options.num_workers)):
        for group in optimizer.param_groups:
            group["lr"] = options.lr * loop.lr_at(first_step + i)
        batch = to_device(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            losses = batch_losses(model, heads, batch, weights, options.pretrain_mask_ratio, generator)
        if losses:
            total = sum(weights[k] * v for k, v in losses.items())
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses["total"] = total
        for name, value in losses.items():
            sums.setdefault(name, []).append(float(value.detach()))
        loop.bar.update(1)
    return {name: float(np.mean(values)) for name, values in sums.items()}


def save_resume(path, model, heads, optimizer, record, epoch):
    """Model, heads and optimizer state after `epoch` finished epochs, in one safetensors file (atomic)."""
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"heads/{k}": v for k, v in heads.state_dict().items()})
    state = optimizer.state_dict()
    for i, values in state["state"].items():
        tensors.update({f"optim/{i}/{k}": v for k, v in values.items()})
    meta = {"epoch": str(epoch), "record": json.dumps(record), "param_groups": json.dumps(state["param_groups"])}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_resume(path, model, heads, optimizer, record):
    """Restore a resume state into model, heads and optimizer. -> (finished epochs, its record); (0, record)
    when there is none. One made with another spec or other options is refused naming the file."""
    if not path.exists():
        return 0, record
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    saved = json.loads(meta["record"])
    diff = options_diff(_settings(saved), _settings(record))
    if diff:
        raise PretrainError(f"{path}: an interrupted pretraining of other settings or stores ({diff}); delete it "
                            "or use --overwrite")
    part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + "/")} for p in ("model", "heads")}
    model.load_state_dict(part["model"])
    heads.load_state_dict(part["heads"])
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["epoch"]), saved


def _settings(record):
    """What a resume state must share with the pretraining it continues: spec, options, stores (not paths)."""
    stores = {split: {"rows": s["rows"], "config": s["config"]} for split, s in record["stores"].items()}
    return {"spec": record["spec"], "options": record["options"], "stores": stores}


def load_pretrained(run_dir, spec, options):
    """The saved pretraining of spec.model, checked against this spec and these options."""
    tensors_path, record_path, _ = pretrain_paths(run_dir, spec.model)
    record = read_json(record_path, PretrainError, "run `python run.py train-neural --pretrain` to make it")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise PretrainError(f"{record_path}: not a pretraining record (field 'format' should be {FORMAT!r})")
    diff = options_diff({"spec": record.get("spec"), "options": record.get("options")},
                        {"spec": spec.to_dict(), "options": options.result_dict()})
    if diff:
        raise PretrainError(f"{record_path}: pretrained with another spec or other options ({diff}); "
                            "use another --out or --overwrite")
    return Pretrained(tensors_path, read_tensors(tensors_path), record)


def pretrain(run_dir, spec, readers, options, device="cpu", say=print):
    """Pretrain spec.model on every store in `readers` ({split: StoreReader}), or reuse what is saved;
    resumes an interrupted one from its last finished epoch. -> Pretrained."""
    tensors_path, record_path, resume_path = pretrain_paths(run_dir, spec.model)
    if record_path.exists():
        return load_pretrained(run_dir, spec, options)
    check_stores(spec, readers)
    weights, skipped = choose_objectives(options, modalities(readers))
    for name, why in skipped.items():
        if why != "weight 0":
            say(f"pretrain {spec.model}: {name} skipped ({why})")
    datasets = [StoreBatches(r, model_inputs(spec.model, r), max_tokens=options.max_tokens) for r in readers.values()]
    sizes = [len(r) for r in readers.values()]
    steps = sum(math.ceil(n / options.batch_size) for n in sizes)
    record = {"format": FORMAT, "model": spec.model, "spec": spec.to_dict(), "options": options.result_dict(),
              "stores": {split: {"rows": len(r), "config": r.config, "path": str(Path(r.path).resolve())}
                         for split, r in readers.items()},
              "objectives": weights, "skipped": skipped, "epochs": options.pretrain_epochs,
              "steps_per_epoch": steps, "epoch_loss": [], "seconds_per_epoch": []}
    seed = options.seed * 100 + 99                        # fold seeds are seed * 100 + k, k < 99
    torch.manual_seed(seed)
    model, heads = build_model(spec).to(device), PretrainHeads(spec).to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=options.lr,
                                  weight_decay=options.weight_decay)
    lr_at = schedule(options.pretrain_epochs * steps, options.warmup_frac)
    start, record = load_resume(resume_path, model, heads, optimizer, record)
    resume_path.parent.mkdir(parents=True, exist_ok=True)
    stores = Stores(datasets)
    bar = tqdm(total=(options.pretrain_epochs - start) * steps, desc=f"pretrain {spec.model}", leave=False,
               mininterval=2)
    loop = PretrainLoop(model, heads, optimizer, lr_at, stores, weights, options, device, bar)
    for epoch in range(start, options.pretrain_epochs):
        began = time.perf_counter()
        plan = epoch_batches(sizes, options.batch_size, seed * 1000 + epoch)
        losses = run_epoch(loop, plan, epoch * steps, seed * 1000 + epoch)
        record["epoch_loss"].append(losses)
        record["seconds_per_epoch"].append(time.perf_counter() - began)
        save_resume(resume_path, model, heads, optimizer, record, epoch + 1)
        bar.set_postfix(loss=f"{losses.get('total', float('nan')):.3f}")
    bar.close()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp))
    write_json(record_path, record, indent=1, sort_keys=True)        # written last: marks it complete
    resume_path.unlink(missing_ok=True)
    return load_pretrained(run_dir, spec, options)


def pretrain_models(run_dir, specs, readers, options, device="cpu", say=print):
    """Main rank, before any fold: pretrain each pretrainable model of `specs` ({name: ModelSpec}) once,
    say which models ignore --pretrain, and record in run.json (field 'pretrained') which stores each saw.
    -> {name: summary}."""
    names = [n for n in specs if pretrainable(n)]
    ignored = [n for n in specs if n not in names]
    if ignored:
        say(f"pretrain: {', '.join(ignored)} not pretrainable (only {', '.join(n for n in registry() if pretrainable(n))}): "
            "--pretrain ignored for them")
    summaries = {n: pretrain(run_dir, specs[n], readers, options, device, say).summary() for n in names}
    done = sorted((Path(run_dir) / PRETRAIN_DIR).glob("*.json"))          # this call's and earlier calls'
    if done:
        run = read_run(run_dir)
        run["pretrained"] = {p.stem: summarise(read_json(p, PretrainError)) for p in done}
        write_json(Path(run_dir) / RUN_FILE, run, indent=1, sort_keys=True)
    return summaries

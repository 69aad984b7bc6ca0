"""The EMA is torch's AveragedModel with the project's warm-up; the LR schedule is the project's own, and
where transformers' cosine schedule and torch's get_ema_multi_avg_fn differ from them, shown here."""
import copy
import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from features.codebook import Codebook
from features.store import StoreReader
from neural import train
from neural.data import StoreBatches
from neural.models import FitContext, model_inputs
from neural.options import NeuralOptions
from neural.spec import spec_from_store
from neural.train import ema_model, fit_fold, predict_rows, schedule
from tests.fakes import TINY

torch.set_num_threads(1)


class OldEMA:
    """neural/train.py's EMA before it became an AveragedModel (the reference the new one must equal)."""

    def __init__(self, model, decay):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for shadow, live in zip(self.model.state_dict().values(), model.state_dict().values()):
            if shadow.dtype.is_floating_point:
                shadow.mul_(d).add_(live.detach(), alpha=1 - d)
            else:
                shadow.copy_(live)


def _net():
    torch.manual_seed(0)        # float buffers (BatchNorm's running stats) and an integer one (batches tracked)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _train(model, steps, *averages):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for update in averages:
            update(model)


def test_the_averaged_model_equals_the_old_ema_bit_for_bit_weights_and_buffers():
    model = _net()
    old, new = OldEMA(model, 0.9), ema_model(model, 0.9)      # 0.9: the warm-up ends at step 80
    _train(model, 120, old.update, new.update_parameters)
    old_state, new_state = old.model.state_dict(), new.module.state_dict()
    assert list(old_state) == list(new_state)                    # saved under the same names as before
    for name in old_state:
        assert torch.equal(old_state[name], new_state[name]), name
    assert new_state["1.num_batches_tracked"] == 120             # integer buffers copied, not averaged
    assert not torch.equal(new_state["1.running_mean"], model.state_dict()["1.running_mean"])   # averaged


def test_torchs_own_ema_fn_has_no_warm_up_and_keeps_the_first_steps_weights():
    """Why get_ema_multi_avg_fn is not used: without the warm-up, after 30 steps at the default decay
    0.995 the average is still 86% the weights after the first step (0.995^29)."""
    model = _net()
    plain = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.995), use_buffers=True)
    ours = ema_model(model, 0.995)
    first = {}
    _train(model, 1, lambda m: first.update({k: v.clone() for k, v in m.state_dict().items()}))
    plain.update_parameters(model)
    ours.update_parameters(model)
    _train(model, 29, plain.update_parameters, ours.update_parameters)
    live, w = model.state_dict()["3.weight"], first["3.weight"]
    share = lambda avg: float(((avg - live) * (w - live)).sum() / ((w - live) ** 2).sum())   # of the first step's
    assert share(plain.module.state_dict()["3.weight"]) > 0.8
    assert share(ours.module.state_dict()["3.weight"]) < 0.05


def test_fit_fold_with_ema_predicts_exactly_as_with_the_old_ema(fake_cache, monkeypatch):
    reader = StoreReader(fake_cache / "labeled.h5")
    opts = NeuralOptions(**dict(TINY, epochs=2, hidden=32, n_heads=4, ema=True, ema_decay=0.9))
    names = model_inputs("vlad", reader)                       # NetVLAD's batch norm: float buffers
    labels = reader.read("label_fine", slice(None))
    dataset = StoreBatches(reader, names, labels, reader.fine_to_coarse, opts.max_tokens)
    codebook = Codebook.load(fake_cache / "codebook.h5")
    spec = spec_from_store("vlad", reader, opts, names, codebook)
    rows = np.arange(len(reader))

    def fitted():
        model, _ = fit_fold(spec, FitContext(dataset, rows, opts.batch_size, codebook=codebook), opts, seed=0,
                            device="cpu")
        return predict_rows([model], dataset, rows, 16, "cpu")

    new = fitted()
    monkeypatch.setattr(train, "ema_model", lambda model, decay: _OldAsAveraged(model, decay))
    old = fitted()
    assert np.array_equal(new, old)


class _OldAsAveraged(OldEMA):
    """OldEMA under AveragedModel's two names, for fit_fold."""
    update_parameters = OldEMA.update

    @property
    def module(self):
        return self.model


def test_the_schedule_is_transformers_cosine_one_warm_up_step_ahead():
    """Why transformers' get_cosine_schedule_with_warmup is not used: its warm-up factor is s / warm (the first
    step learns nothing, every warm-up step is one behind), ours (s + 1) / warm; the cosine part is the same."""
    from transformers import get_cosine_schedule_with_warmup
    total, frac = 200, 0.1
    warm = int(total * frac)
    ours = schedule(total, frac)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_schedule_with_warmup(optimizer, warm, total).lr_lambdas[0]
    assert theirs(0) == 0.0 and ours(0) == 1 / warm
    assert all(ours(s) == pytest.approx(theirs(s + 1), abs=1e-15) for s in range(warm))
    assert all(ours(s) == pytest.approx(theirs(s), abs=1e-12) for s in range(warm, total))
    assert ours(total - 1) == pytest.approx(0.5 * (1 + math.cos(math.pi * (total - 1 - warm) / (total - warm))))

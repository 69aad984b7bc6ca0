"""Self-supervised pretraining (neural/pretrain.py) on tiny fake stores: each objective learns, a
frames-only cache skips the text objectives, a killed pretraining resumes exactly, folds start from the
pretrained weights, and a pretrained run's fold checkpoints predict without the pretrain files."""
import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from core import schema
from features.store import StoreDims, StoreReader, StoreWriter, create_store
from neural import pretrain as pretrain_module
from neural.data import StoreBatches
from neural.models import FitContext, build_model, model_inputs
from neural.models.blocks import masked_mean
from neural.options import NeuralOptions
from neural.pipeline import train_neural
from neural.predict import predict_store
from neural.pretrain import PretrainError, pretrain, pretrain_paths
from neural.spec import spec_from_store
from neural.train import fit_fold
from tests.fakes import TINY, fake_category_map, killed_on_call, write_fake_store

torch.set_num_threads(1)

TINY = dict(TINY, epochs=2, hidden=32, n_heads=4, lr=3e-3, threads=1)
ONLY = {name: {f"pretrain_{o}": float(o == name) for o in ("mfm", "mtm", "vtm", "vtc")}
        for name in ("mfm", "mtm", "vtm", "vtc")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A labelled store (60 videos), an unlabelled one (40) and a test one (20)."""
    d = tmp_path_factory.mktemp("cache")
    write_fake_store(d / "labeled.h5", n=60)
    write_fake_store(d / "unlabeled.h5", n=40, split="unlabeled", labelled=False, seed=2)
    write_fake_store(d / "test.h5", n=20, split="test", labelled=False, seed=1)
    return d


def readers_of(cache_dir, splits=("labeled", "unlabeled", "test")):
    return {s: StoreReader(cache_dir / f"{s}.h5") for s in splits}


def spec_of(model, readers, options):
    labelled = readers["labeled"]
    return spec_from_store(model, labelled, options, model_inputs(model, labelled))


def a_batch(cache_dir, n=12):
    reader = StoreReader(cache_dir / "labeled.h5")
    return StoreBatches(reader, model_inputs("single", reader), max_tokens=64)[np.arange(n)]


def old_forward(model, batch):
    """The forward passes as they were before encode/pool existed, arithmetic for arithmetic."""
    text, text_mask, video, video_mask = model.front(batch)
    if type(model).__name__ == "CrossAttention":
        for t2v, v2t in zip(model.text_to_video, model.video_to_text):
            text, video = t2v(text, video, video_mask), v2t(video, text, text_mask)
        z = torch.cat([masked_mean(text, text_mask), masked_mean(video, video_mask)], dim=1)
        return model.heads(model.fuse(z))
    if type(model).__name__ == "DualStream":
        text = model.text_encoder(text, src_key_padding_mask=~text_mask)
        video = model.video_encoder(video, src_key_padding_mask=~video_mask)
        x, mask = torch.cat([text, video], dim=1), torch.cat([text_mask, video_mask], dim=1)
        x = model.norm(model.fusion(x, src_key_padding_mask=~mask))
    else:
        x, mask = torch.cat([text, video], dim=1), torch.cat([text_mask, video_mask], dim=1)
        x = model.norm(model.encoder(x, src_key_padding_mask=~mask))
    return model.heads(masked_mean(x, mask))


@pytest.mark.parametrize("model_name", ["single", "dual", "cross"])
def test_forward_is_heads_of_pool_of_encode_bit_for_bit_as_before(cache, model_name):
    readers = readers_of(cache, ("labeled",))
    torch.manual_seed(0)
    model = build_model(spec_of(model_name, readers, NeuralOptions(**TINY))).eval()
    batch = a_batch(cache)
    with torch.no_grad():
        fine, coarse = model(batch)
        old_fine, old_coarse = old_forward(model, batch)
        text, text_mask, video, video_mask = model.encode(batch)
    assert torch.equal(fine, old_fine) and torch.equal(coarse, old_coarse)
    assert text.shape[:2] == text_mask.shape and video.shape[:2] == video_mask.shape
    assert video.shape[1] == batch[schema.FRAME_EMB].shape[1] and text.shape[-1] == 32


@pytest.mark.parametrize("objective,epochs", [("mfm", 4), ("mtm", 4), ("vtc", 4), ("vtm", 12)])
def test_each_objective_loss_falls(cache, tmp_path, objective, epochs):
    readers = readers_of(cache)
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=epochs, **ONLY[objective])
    done = pretrain(tmp_path, spec_of("cross", readers, options), readers, options)
    losses = [e[objective] for e in done.record["epoch_loss"]]
    assert set(done.record["objectives"]) == {objective}
    assert np.mean(losses[-2:]) < 0.85 * losses[0], losses


def write_frames_only_store(path, n=48, n_frames=6, frame_dim=16, seed=0):
    """A store of frames whose every text field and token is empty (masked, zero), as extract writes
    for data without text."""
    rng = np.random.default_rng(seed)
    cmap = fake_category_map(6)
    fine = np.arange(n) % 6
    create_store(path, "labeled", [f"v{i:05d}" for i in range(n)], fine, cmap.fine_to_coarse[fine],
                 StoreDims(n_frames, frame_dim, 8, 2), {"frames_only": True}, cmap)
    frames = rng.normal(size=(6, frame_dim))[fine][:, None, :] * 2 + rng.normal(size=(n, n_frames, frame_dim))
    writer = StoreWriter(path)
    writer.write_rows(0, {schema.FRAME_EMB: frames.astype(np.float16), schema.FRAME_MASK: np.ones((n, n_frames), bool),
                          schema.TEXT_POOLED: np.zeros((n, 3, 8), np.float16),
                          schema.TEXT_FIELD_MASK: np.zeros((n, 3), bool), schema.TEXT_LEN: np.zeros((n, 3), np.int32),
                          schema.TEXT_TOKENS: np.zeros((n, 2, 8), np.float16),
                          schema.TEXT_TOKEN_MASK: np.zeros((n, 2), bool)})
    writer.mark_complete()
    writer.close()


def test_a_frames_only_cache_skips_the_text_objectives_and_still_learns_masked_frames(tmp_path):
    write_frames_only_store(tmp_path / "labeled.h5")
    readers = readers_of(tmp_path, ("labeled",))
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=4)
    said = []
    done = pretrain(tmp_path / "run", spec_of("single", readers, options), readers, options, say=said.append)
    assert set(done.record["objectives"]) == {"mfm"}
    assert done.record["skipped"] == {"mtm": "no store has text", "vtm": "no store has text",
                                      "vtc": "no store has text"}
    assert len(said) == 3 and all("skipped (no store has text)" in line for line in said), said
    losses = [e["mfm"] for e in done.record["epoch_loss"]]
    assert set(done.record["epoch_loss"][0]) == {"mfm", "total"}
    assert np.mean(losses[-2:]) < 0.85 * losses[0], losses


def test_a_killed_pretraining_resumes_from_its_last_epoch_to_the_same_weights(cache, tmp_path, monkeypatch):
    readers = readers_of(cache)
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=3)
    spec = spec_of("single", readers, options)
    straight = pretrain(tmp_path / "straight", spec, readers, options)

    real_epoch = pretrain_module.run_epoch
    monkeypatch.setattr(pretrain_module, "run_epoch", killed_on_call(real_epoch, 2))  # killed in epoch 2
    with pytest.raises(KeyboardInterrupt):
        pretrain(tmp_path / "resumed", spec, readers, options)
    tensors_path, record_path, resume_path = pretrain_paths(tmp_path / "resumed", "single")
    assert resume_path.exists() and not record_path.exists() and not tensors_path.exists()

    epochs = []
    monkeypatch.setattr(pretrain_module, "run_epoch", lambda *a, **kw: epochs.append(a[-3]) or real_epoch(*a, **kw))
    resumed = pretrain(tmp_path / "resumed", spec, readers, options)
    assert len(epochs) == 2                                  # epoch 1 came back from the resume state
    assert not resume_path.exists()
    assert straight.tensors.keys() == resumed.tensors.keys()
    for name, t in straight.tensors.items():
        assert torch.equal(t, resumed.tensors[name]), name
    assert resumed.record["epoch_loss"] == straight.record["epoch_loss"]


def test_folds_start_from_the_pretrained_weights(cache, tmp_path):
    readers = readers_of(cache)
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=1)
    spec = spec_of("dual", readers, options)
    done = pretrain(tmp_path, spec, readers, options)
    saved = load_file(str(pretrain_paths(tmp_path, "dual")[0]))
    assert saved.keys() == done.tensors.keys() and not any(k.startswith("heads.") for k in saved)
    reader = readers["labeled"]
    dataset = StoreBatches(reader, model_inputs("dual", reader), reader.read("label_fine", slice(None)),
                           reader.fine_to_coarse, options.max_tokens)
    untrained = NeuralOptions(**dict(TINY, epochs=0))           # the model as fit_fold starts training it
    rows = np.arange(40)
    start, _ = fit_fold(spec, FitContext(dataset, rows, untrained.batch_size, pretrained=done), untrained, seed=5,
                        device="cpu")
    random, _ = fit_fold(spec, FitContext(dataset, rows, untrained.batch_size), untrained, seed=5, device="cpu")
    start, random = start.state_dict(), random.state_dict()
    for name, t in saved.items():
        assert torch.equal(start[name], t), name
    assert any(not torch.equal(random[name], t) for name, t in saved.items())
    for name in start:
        if name.startswith("heads."):                          # the heads keep the fold's own initialisation
            assert torch.equal(start[name], random[name]), name


def test_pretrained_weights_that_do_not_fit_name_the_file(cache, tmp_path):
    readers = readers_of(cache, ("labeled",))
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=1)
    done = pretrain(tmp_path, spec_of("cross", readers, options), readers, options)
    other = build_model(spec_of("cross", readers, NeuralOptions(**dict(TINY, hidden=16))))
    with pytest.raises(PretrainError, match=r"cross\.safetensors: pretrained tensors do not fit"):
        done.load_into(other)


def test_a_pretrained_run_records_its_stores_and_its_folds_predict_without_the_pretrain_files(cache, tmp_path, capsys):
    options = NeuralOptions(**TINY, pretrain=True, pretrain_epochs=1)
    train_neural(cache, tmp_path / "run", ["single", "linear"], options)
    said = capsys.readouterr().out
    assert said.count("linear not pretrainable") == 1, said
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert list(run["pretrained"]) == ["single"]
    assert run["pretrained"]["single"]["stores"] == {"labeled": 60, "test": 20, "unlabeled": 40}
    assert run["pretrained"]["single"]["file"] == "pretrain/single.safetensors"
    record = json.loads((tmp_path / "run" / "pretrain" / "single.json").read_text())
    assert record["stores"]["unlabeled"]["config"] == {"fake": True} and record["steps_per_epoch"] == 4 + 3 + 2
    with h5py.File(tmp_path / "run" / "single" / "predictions.h5", "r") as h5:
        recorded = json.loads(h5.attrs["options"])
        assert recorded["pretrain"] is True                       # the option, beside the record of what it saw
        test_proba = h5["proba/test"][:]
    assert recorded["pretrained"]["stores"] == run["pretrained"]["single"]["stores"]
    with h5py.File(tmp_path / "run" / "linear" / "predictions.h5", "r") as h5:
        assert "pretrained" not in json.loads(h5.attrs["options"])
    train_neural(cache, tmp_path / "run", ["linear"], options)     # a rerun naming other models keeps the record
    assert json.loads((tmp_path / "run" / "run.json").read_text())["pretrained"] == run["pretrained"]
    shutil.rmtree(tmp_path / "run" / "pretrain")
    proba = predict_store(tmp_path / "run", cache / "test.h5", models=["single"])["single"]
    np.testing.assert_allclose(proba, test_proba, atol=1e-6)


def test_cli_pretrain_flags_reach_the_run(cache, tmp_path):
    from run import cli
    result = CliRunner().invoke(cli, ["train-neural", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                      "--models", "cross", "--folds", "2", "--epochs", "1", "--hidden", "16",
                                      "--batch-size", "32", "--threads", "1", "--pretrain", "--pretrain-epochs", "1"])
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["options"]["pretrain"] is True and run["options"]["pretrain_epochs"] == 1
    assert (tmp_path / "run" / "pretrain" / "cross.safetensors").exists()
    assert "cross: OOF mean-F1" in result.output
    assert "unlabelled split: unlabeled (unlabeled.h5, found in the cache), used for self-supervised " \
           "pretraining of cross" in result.output, result.output


def test_masked_positions_are_padded_to_a_few_sizes_without_changing_the_loss():
    """The masked-state loss on positions padded to a multiple of the bucket equals (value and gradient)
    the loss on the chosen positions alone, and its tensors take few sizes whatever the draw."""
    from neural.pretrain import TEMPERATURE, info_nce, masked_state_loss, padded_positions
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5)
    sizes = set()
    for draw in range(20):
        states = torch.randn(6, 9, 8, requires_grad=True)
        targets = torch.randn(6, 9, 5)
        at = torch.rand(6, 9) < 0.3
        at[0, :2] = True                                                  # at least two positions
        plain = info_nce(head(states[at]), targets[at], 1 / TEMPERATURE)
        padded = masked_state_loss(head, states, targets, at)
        torch.testing.assert_close(padded, plain)
        torch.testing.assert_close(torch.autograd.grad(padded, states)[0], torch.autograd.grad(plain, states)[0])
        index, real = padded_positions(at, 16)
        assert len(index) % 16 == 0 and int(real.sum()) == int(at.sum()) and torch.equal(
            index[real], torch.nonzero(at.flatten()).squeeze(1))
        sizes.add(len(index))
    assert len(sizes) <= 2, sizes                  # 54 positions at 0.3: 16 +- 4 chosen -> 16 or 32


def _old_match_loss(model, heads, batch, both, generator):
    """match_loss as it was before its pairs were padded to the batch's rows, arithmetic for arithmetic."""
    rows = torch.nonzero(both).squeeze(1)
    n = len(rows)
    swapped = torch.zeros(n, dtype=torch.bool)
    swapped[torch.randperm(n, generator=generator)[: n // 2]] = True
    other = torch.roll(torch.arange(n), 1)
    pairs = {k: v[rows] for k, v in batch.items()}
    for key in (schema.FRAME_EMB, schema.FRAME_MASK):
        x = pairs[key]
        pairs[key] = torch.where(swapped.view(-1, *[1] * (x.dim() - 1)), x[other], x)
    logit = heads.match(model.pool(*model.encode(pairs))).squeeze(-1)
    return torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), (~swapped).float())


@pytest.mark.parametrize("model_name", ["single", "cross"])
def test_match_pairs_padded_to_the_batch_give_the_loss_of_the_real_pairs(cache, model_name):
    """Rows without text pad the matching pairs (so the encoder's tensors keep the batch's size); the loss
    is the one over the real pairs alone, as before the padding (eval mode: no dropout draws)."""
    from neural.pretrain import PretrainHeads, match_loss
    readers = readers_of(cache, ("labeled",))
    spec = spec_of(model_name, readers, NeuralOptions(**TINY))
    torch.manual_seed(0)
    model, heads = build_model(spec).eval(), PretrainHeads(spec).eval()
    batch = a_batch(cache)
    batch[schema.TEXT_TOKEN_MASK][[1, 4, 5]] = False                   # 9 of 12 rows have both
    both = batch[schema.TEXT_TOKEN_MASK].any(1) & batch[schema.FRAME_MASK].any(1)
    assert int(both.sum()) == 9
    with torch.no_grad():
        padded = match_loss(model, heads, batch, both, torch.Generator().manual_seed(3))
        plain = _old_match_loss(model, heads, batch, both, torch.Generator().manual_seed(3))
    torch.testing.assert_close(padded, plain)

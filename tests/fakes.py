"""Small, complete feature stores with planted class signal, for tests of the stages after extract."""
import numpy as np

from core import schema
from features.categories import CategoryMap
from features.class_names import save_class_names
from features.store import StoreDims, StoreWriter, create_store

# the smallest train-neural options a fold fits with; modules widen them where a test needs it to learn
TINY = dict(n_folds=3, epochs=1, hidden=16, batch_size=16, n_heads=2)


def fake_category_map(n_fine=6, n_coarse=3):
    fine_ids = [f"{i % n_coarse:02d}{i:02d}" for i in range(n_fine)]
    order = np.argsort(fine_ids)
    fine_ids = [fine_ids[i] for i in order]
    coarse_ids = sorted({f[:2] for f in fine_ids})
    return CategoryMap(fine_ids, coarse_ids, np.array([coarse_ids.index(f[:2]) for f in fine_ids], np.int32))


def write_fake_store(path, n=60, n_classes=6, n_frames=8, frame_dim=16, text_dim=12, n_tokens=10,
                     split="labeled", labelled=True, seed=0, signal=2.0, class_names_path=None):
    """A complete store whose frames and text carry the label; returns the labels (N,).

    class_names_path: also write a class_names.h5 there whose name vectors are the text's class centres."""
    rng = np.random.default_rng(seed)
    cmap = fake_category_map(n_classes)
    label = np.arange(n) % n_classes                        # (N,) every class present
    rng.shuffle(label)
    dims = StoreDims(n_frames, frame_dim, text_dim, n_tokens)
    fine = label if labelled else np.full(n, -1)
    coarse = cmap.fine_to_coarse[label] if labelled else np.full(n, -1)
    ids = [f"{split}{i:05d}" for i in range(n)]
    create_store(path, split, ids, fine, coarse, dims, {"fake": True}, cmap)
    frame_centres = rng.normal(size=(n_classes, frame_dim)) * signal
    text_centres = rng.normal(size=(n_classes, text_dim)) * signal
    n_valid = rng.integers(1, n_frames + 1, size=n)         # (N,) real frames per video
    frame_mask = np.arange(n_frames)[None, :] < n_valid[:, None]           # (N, F)
    frame_emb = frame_centres[label][:, None, :] + rng.normal(size=(n, n_frames, frame_dim))
    frame_emb *= frame_mask[..., None]
    token_mask = np.arange(n_tokens)[None, :] < rng.integers(2, n_tokens + 1, size=n)[:, None]
    text_tokens = (text_centres[label][:, None, :] + rng.normal(size=(n, n_tokens, text_dim))) * token_mask[..., None]
    text_pooled = text_centres[label][:, None, :] + rng.normal(size=(n, 3, text_dim))
    writer = StoreWriter(path)
    writer.write_rows(0, {
        schema.FRAME_EMB: frame_emb.astype(np.float16),
        schema.FRAME_MASK: frame_mask,
        schema.TEXT_POOLED: text_pooled.astype(np.float16),
        schema.TEXT_FIELD_MASK: np.ones((n, 3), bool),
        schema.TEXT_LEN: rng.integers(1, 50, size=(n, 3)).astype(np.int32),
        schema.TEXT_TOKENS: text_tokens.astype(np.float16),
        schema.TEXT_TOKEN_MASK: token_mask,
    })
    writer.mark_complete()
    writer.close()
    if class_names_path is not None:
        coarse = np.stack([text_centres[cmap.fine_to_coarse == c].mean(0) for c in range(cmap.n_coarse)])
        save_class_names(class_names_path, cmap, [f"class {c}" for c in cmap.fine_ids], text_centres,
                         [f"group {c}" for c in cmap.coarse_ids], coarse, {"fake": True})
    return label


def add_aggregates(cache_dir, splits):
    """agg/* and CACHE_DIR/codebook.h5 by the real aggregates stage, with small settings."""
    from features.aggregates import AggregateOptions, run_aggregates
    run_aggregates(cache_dir, splits, AggregateOptions(pca_dim=8, n_clusters=4, n_gmm=2, nextvlad_groups=4,
                                                       sample_size=400, batch_size=32))


def killed_on_call(real, n):
    """`real` wrapped to raise KeyboardInterrupt (a kill) on its n-th call, for resume tests."""
    calls = []

    def wrapper(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kw)
    return wrapper

"""A complete store of random features with the extract's shapes, written without running extract: for
measuring the cost of the stages that read a store (bench scale, bench pretrain_memory, bench
train_neural scale) at sizes an extract would take hours to make. Its features mean nothing beyond a
weak planted class centre: it measures time and memory, never a score.
"""
import numpy as np

from core import schema
from demo.synthetic import long_tail_counts
from features.categories import load_category_map
from features.store import StoreDims, StoreWriter, create_store

TEXT_DIM = 384                  # MiniLM's width: the text of a real extract


def write_synthetic_store(cache_dir, n, n_frames=32, frame_dim=768, n_tokens=32, text_dim=TEXT_DIM, seed=0,
                          signal=0.1, tail_ratio=100.0, block=1024, n_classes=None):
    """CACHE_DIR/labeled.h5 of n labelled videos with random features of the extract's shapes, written
    through the project's store writer in blocks of rows (memory does not grow with n). For measuring
    cost only: the features are class centroid * signal + N(0, 1) noise, like the generator's frames.
    n_classes: label only the first n_classes of the challenge's 200-class map (default: all of them)."""
    cmap = load_category_map()
    rng = np.random.default_rng(seed)
    used = n_classes or cmap.n_fine
    label = np.repeat(np.arange(used), long_tail_counts(n, used, tail_ratio))
    rng.shuffle(label)                                                                       # (N,)
    frame_centres = rng.standard_normal((cmap.n_fine, frame_dim), dtype=np.float32) * signal
    text_centres = rng.standard_normal((cmap.n_fine, text_dim), dtype=np.float32) * signal
    path = schema.store_path(cache_dir, schema.LABELLED_SPLIT)
    config = {"synthetic": "demo.synthetic_store: random features, for measuring cost only",
              "options": {"frames": n_frames, "max_tokens": n_tokens, "seed": seed}}
    create_store(path, schema.LABELLED_SPLIT, [f"s{i:07d}" for i in range(n)], label, cmap.fine_to_coarse[label],
                 StoreDims(n_frames, frame_dim, text_dim, n_tokens), config, cmap)
    writer = StoreWriter(path)
    for start in range(0, n, block):
        r = np.random.default_rng([seed, start])
        y = label[start:start + block]
        b = len(y)
        full = r.random(b) < 0.75                          # like the generator: 3 in 4 videos full length
        n_valid = np.where(full, n_frames, r.integers(1, max(n_frames, 2), size=b))
        frame_mask = np.arange(n_frames)[None, :] < n_valid[:, None]                      # (B, F)
        frames = r.standard_normal((b, n_frames, frame_dim), dtype=np.float32)
        frames += frame_centres[y][:, None, :]
        frames *= frame_mask[..., None]
        token_mask = np.arange(n_tokens)[None, :] < r.integers(4, n_tokens + 1, size=b)[:, None]   # (B, T)
        tokens = r.standard_normal((b, n_tokens, text_dim), dtype=np.float32)
        tokens += text_centres[y][:, None, :]
        tokens *= token_mask[..., None]
        field_mask = np.column_stack([np.ones(b, bool), r.random(b) < 0.7, r.random(b) < 0.5])      # (B, 3)
        pooled = (r.standard_normal((b, 3, text_dim), dtype=np.float32) + text_centres[y][:, None, :]) \
            * field_mask[..., None]
        writer.write_rows(start, {
            schema.FRAME_EMB: frames.astype(np.float16),
            schema.FRAME_MASK: frame_mask,
            schema.TEXT_POOLED: pooled.astype(np.float16),
            schema.TEXT_FIELD_MASK: field_mask,
            schema.TEXT_LEN: (r.integers(1, 200, size=(b, 3)) * field_mask).astype(np.int32),
            schema.TEXT_TOKENS: tokens.astype(np.float16),
            schema.TEXT_TOKEN_MASK: token_mask,
        })
    writer.mark_complete()
    writer.close()
    return path

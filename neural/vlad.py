"""The vlad model's frame pooling: the aggregates stage's layer, initialised from CACHE_DIR/codebook.h5,
here made trainable (PCA projection included)."""
from features.aggregates import Codebook, init_pooling


def build_pooling(spec, codebook_path):
    """(B, F, D) -> (B, W) trainable NeXtVLAD or NetVLAD, from the codebook `extract` fitted."""
    codebook = Codebook.load(codebook_path)      # names `python run.py extract` when the file is absent
    if codebook.frame_dim != spec["frame_dim"]:
        raise ValueError(f"{codebook_path}: codebook fitted on {codebook.frame_dim}-d frames, the store has "
                         f"{spec['frame_dim']}-d frames; rerun extract for this cache directory")
    pooling = init_pooling(spec["vlad_pooling"], codebook).train()
    for p in pooling.parameters():
        p.requires_grad_(True)
    return pooling

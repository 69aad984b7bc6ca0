"""The layout of the HDF5 feature store: the one contract between `features/` and its readers.

One file per split, `<cache_dir>/<split>.h5`. Every per-video dataset has N rows in the order of the
annotations file and is chunked by video, so a reader touches only the rows it asks for.

    ids                  (N,)          str     video ids, annotation order
    label_fine           (N,)          int32   index into attrs["fine_classes"], -1 when unknown
    label_coarse         (N,)          int32   index into attrs["coarse_classes"], -1 when unknown
    frame_emb            (N, F, D)     float16 frame encoder output, zeros where masked
    frame_mask           (N, F)        bool    True for a real frame
    text_pooled          (N, 3, Dt)    float16 pooled embedding of title, ocr, asr (TEXT_FIELDS order)
    text_field_mask      (N, 3)        bool    True where that field had text
    text_len             (N, 3)        int32   characters in title, ocr, asr
    text_tokens          (N, T, Dt)    float16 last hidden states of "title [SEP] ocr [SEP] asr"
    text_token_mask      (N, T)        bool    True for a real token
    done                 (N,)          bool    row finished (resume marker; written after its data)
    agg/<name>           (N, ...)      float16 engineered aggregates (features/aggregates.py)

File attributes: schema_version, split, complete (True only once every row is done), config (JSON, the
store's identity: encoder names, weight checksums, options, category map sha256, precision),
environment (JSON, not compared: package versions, device), inputs (JSON, what the store was made from:
annotations sha256 and a digest of each media file's name, size and mtime, features/inputs.py; compared
on resume and by predict, absent in older stores), fine_classes, coarse_classes
(category ids as strings), fine_to_coarse (int32 array, index of each fine class's coarse class).
"""

SCHEMA_VERSION = 1
TEXT_FIELDS = ("title", "ocr", "asr")

IDS = "ids"
LABEL_FINE = "label_fine"
LABEL_COARSE = "label_coarse"
FRAME_EMB = "frame_emb"
FRAME_MASK = "frame_mask"
TEXT_POOLED = "text_pooled"
TEXT_FIELD_MASK = "text_field_mask"
TEXT_LEN = "text_len"
TEXT_TOKENS = "text_tokens"
TEXT_TOKEN_MASK = "text_token_mask"
DONE = "done"
AGG_GROUP = "agg"
LABELLED_SPLIT = "labeled"         # the split train-neural learns from; the others are predicted


def store_path(cache_dir, split):
    """Where the store of one split lives."""
    from pathlib import Path
    return Path(cache_dir) / f"{split}.h5"

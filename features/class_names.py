"""CACHE_DIR/class_names.h5: the category map's names, embedded once by the store's text encoder.

A class with no training videos can still be recognised when its name shows in the text (zero-shot):
the `names` model (neural/models.py) scores each video's pooled text fields against these vectors.
Names are pooled exactly as the store pools a text field (masked mean of the last hidden state).

    fine_ids (C,) str, fine_texts (C,) str "<level1_name> <level2_name>", fine_emb (C, Dt) float32
    coarse_ids (C1,) str, coarse_texts (C1,) str "<level1_name>", coarse_emb (C1, Dt) float32
    attrs: text_encoder (spec), text_checksum, precision (the encoder's)

Written only when every fine class has a name (the challenge's own map has none), and atomically.
"""
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from core.records import atomic_path

CLASS_NAMES_FILE = "class_names.h5"
NAME_TOKENS = 32                       # class names are a few words


class ClassNamesError(ValueError):
    pass


@dataclass
class ClassNames:
    fine_ids: list
    fine_emb: np.ndarray               # (C, Dt) float32
    coarse_ids: list
    coarse_emb: np.ndarray             # (C1, Dt) float32


def class_texts(category_map):
    """(fine texts (C,), coarse texts (C1,)), or None when some fine class has no name."""
    if not category_map.fine_names or not all(n.strip() for n in category_map.fine_names):
        return None
    coarse = [n.strip() for n in category_map.coarse_names]
    fine = [f"{coarse[c]} {n.strip()}".strip() for c, n in zip(category_map.fine_to_coarse, category_map.fine_names)]
    return fine, coarse


def embed_texts(texts, text_encoder, batch_size=64):
    """(len(texts), Dt) float32 pooled embeddings, one text at a time in the store's way."""
    out = []
    for start in range(0, len(texts), batch_size):
        tok = text_encoder.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=NAME_TOKENS, return_tensors="pt")
        out.append(text_encoder.encode(tok["input_ids"], tok["attention_mask"])[1].numpy())
    return np.concatenate(out).astype(np.float32)


def write_class_names(cache_dir, category_map, text_encoder, encoder_spec):
    """Embed the map's names into CACHE_DIR/class_names.h5 -> its path, or None when the map has no names.

    An existing file made from the same names and encoder weights is kept as it is."""
    texts = class_texts(category_map)
    if texts is None:
        return None
    fine_texts, coarse_texts = texts
    path = Path(cache_dir) / CLASS_NAMES_FILE
    if path.exists() and _same_file(path, category_map, fine_texts, text_encoder):
        return path
    fine_emb, coarse_emb = embed_texts(fine_texts, text_encoder), embed_texts(coarse_texts, text_encoder)
    save_class_names(path, category_map, fine_texts, fine_emb, coarse_texts, coarse_emb,
                     {"text_encoder": encoder_spec, "text_checksum": text_encoder.checksum,
                      "precision": text_encoder.precision})
    return path


def save_class_names(path, category_map, fine_texts, fine_emb, coarse_texts, coarse_emb, attrs):
    """Write the file's datasets (see the module docstring) through a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        strings = h5py.string_dtype()
        h5.create_dataset("fine_ids", data=list(category_map.fine_ids), dtype=strings)
        h5.create_dataset("fine_texts", data=list(fine_texts), dtype=strings)
        h5.create_dataset("fine_emb", data=np.asarray(fine_emb, np.float32))
        h5.create_dataset("coarse_ids", data=list(category_map.coarse_ids), dtype=strings)
        h5.create_dataset("coarse_texts", data=list(coarse_texts), dtype=strings)
        h5.create_dataset("coarse_emb", data=np.asarray(coarse_emb, np.float32))
        h5.attrs.update(attrs)


def _same_file(path, category_map, fine_texts, text_encoder):
    with h5py.File(path, "r") as h5:
        return (h5.attrs.get("text_checksum") == text_encoder.checksum
                and h5.attrs.get("precision") == text_encoder.precision
                and list(h5["fine_ids"].asstr()[:]) == list(category_map.fine_ids)
                and list(h5["fine_texts"].asstr()[:]) == list(fine_texts))


def load_class_names(cache_dir, fine_ids=None):
    """ClassNames of CACHE_DIR; refuses a missing file or one made for other classes (`fine_ids`)."""
    path = Path(cache_dir) / CLASS_NAMES_FILE
    if not path.exists():
        raise ClassNamesError(f"{path}: no class names; `extract` writes it only when the category map "
                              f"names every class (level1_name, level2_name columns), so the names model "
                              f"cannot run on this cache")
    with h5py.File(path, "r") as h5:
        names = ClassNames(list(h5["fine_ids"].asstr()[:]), h5["fine_emb"][:],
                           list(h5["coarse_ids"].asstr()[:]), h5["coarse_emb"][:])
    if fine_ids is not None and list(fine_ids) != names.fine_ids:
        raise ClassNamesError(f"{path}: made for other fine classes ({len(names.fine_ids)}) than the store's "
                              f"({len(fine_ids)}); rerun extract with the store's category map")
    return names

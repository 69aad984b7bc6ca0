"""class_names.h5: the category map's names embedded by the real text encoder, reused, refused when wrong."""
import numpy as np
import pytest

from features.categories import CategoryMap
from features.class_names import (CLASS_NAMES_FILE, ClassNamesError, embed_texts, load_class_names,
                                  write_class_names)

NAMED = CategoryMap(["0000", "0001", "0100"], ["00", "01"], np.array([0, 0, 1], np.int32),
                    fine_names=["Watches", "Sunglasses", "Sports Shoes"], coarse_names=["Accessories", "Footwear"])
UNNAMED = CategoryMap(["0000", "0001"], ["00"], np.array([0, 0], np.int32), fine_names=["", ""], coarse_names=[""])


@pytest.fixture(scope="module")
def minilm():
    from features.encoders import build_text_encoder
    return build_text_encoder("minilm")


def test_names_are_embedded_so_a_title_finds_its_class(tmp_path, minilm):
    path = write_class_names(tmp_path, NAMED, minilm, "minilm")
    names = load_class_names(tmp_path, NAMED.fine_ids)
    assert names.fine_emb.shape == (3, minilm.dim) and names.coarse_emb.shape == (2, minilm.dim)
    titles = embed_texts(["Casio men black digital wrist watch", "Ray-Ban unisex aviator sunglasses",
                          "Nike men running sports shoes"], minilm)                       # (3, Dt)
    cos = (titles / np.linalg.norm(titles, axis=1, keepdims=True)) @ \
        (names.fine_emb / np.linalg.norm(names.fine_emb, axis=1, keepdims=True)).T       # (3, C)
    assert list(cos.argmax(axis=1)) == [0, 1, 2]
    before = path.stat().st_mtime_ns
    write_class_names(tmp_path, NAMED, minilm, "minilm")                 # same names, same weights: kept
    assert path.stat().st_mtime_ns == before
    renamed = CategoryMap(NAMED.fine_ids, NAMED.coarse_ids, NAMED.fine_to_coarse,
                          fine_names=["Wallets", "Sunglasses", "Sports Shoes"], coarse_names=NAMED.coarse_names)
    write_class_names(tmp_path, renamed, minilm, "minilm")               # other names: embedded again
    assert not np.allclose(load_class_names(tmp_path).fine_emb[0], names.fine_emb[0])


def test_a_map_without_names_writes_nothing_and_the_reader_says_why(tmp_path, minilm):
    assert write_class_names(tmp_path, UNNAMED, minilm, "minilm") is None
    assert not (tmp_path / CLASS_NAMES_FILE).exists()
    with pytest.raises(ClassNamesError, match=f"{CLASS_NAMES_FILE}.*names every class"):
        load_class_names(tmp_path)


def test_names_made_for_other_classes_are_refused(tmp_path, minilm):
    write_class_names(tmp_path, NAMED, minilm, "minilm")
    with pytest.raises(ClassNamesError, match="other fine classes"):
        load_class_names(tmp_path, ["0000", "0001"])

"""The two-level category map: fine category ids, their coarse classes, and label indices."""
import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BUILTIN_MAP = Path(__file__).parent / "data" / "wechat2022_category_map.csv"
MAP_COLUMNS = ("category_id", "level1_id", "level1_name", "level2_name")


class CategoryMapError(ValueError):
    pass


@dataclass
class CategoryMap:
    fine_ids: list                    # (C,) category ids as strings, sorted
    coarse_ids: list                  # (C1,) coarse ids, sorted
    fine_to_coarse: np.ndarray        # (C,) index into coarse_ids
    fine_names: list = field(default_factory=list)
    coarse_names: list = field(default_factory=list)

    def __post_init__(self):
        self._fine_index = {c: i for i, c in enumerate(self.fine_ids)}

    @property
    def n_fine(self):
        return len(self.fine_ids)

    @property
    def n_coarse(self):
        return len(self.coarse_ids)

    def fine_index(self, category_id):
        """Index of a fine category id, or None when the map does not have it."""
        return self._fine_index.get(category_id)


def load_category_map(path=None):
    """Read `category_id,level1_id,level1_name,level2_name` (the built-in challenge map by default)."""
    path = Path(path) if path else BUILTIN_MAP
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as err:
        raise CategoryMapError(f"{path}: cannot read category map: {err}") from err
    if not rows or any(col not in rows[0] for col in MAP_COLUMNS[:2]):
        raise CategoryMapError(f"{path}: a category map needs the columns {', '.join(MAP_COLUMNS)}")
    rows = sorted(rows, key=lambda r: r["category_id"])
    fine_ids = [r["category_id"] for r in rows]
    if len(set(fine_ids)) != len(fine_ids):
        raise CategoryMapError(f"{path}: duplicate category_id in the map")
    coarse_ids = sorted({r["level1_id"] for r in rows})
    coarse_index = {c: i for i, c in enumerate(coarse_ids)}
    coarse_names = {r["level1_id"]: r.get("level1_name", "") for r in rows}
    return CategoryMap(
        fine_ids=fine_ids,
        coarse_ids=coarse_ids,
        fine_to_coarse=np.array([coarse_index[r["level1_id"]] for r in rows], np.int32),
        fine_names=[r.get("level2_name", "") for r in rows],
        coarse_names=[coarse_names[c] for c in coarse_ids],
    )

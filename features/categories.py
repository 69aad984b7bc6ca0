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
    rows = _read_rows(path)
    rows = sorted(rows, key=lambda r: r["category_id"])
    coarse_ids = sorted({r["level1_id"] for r in rows})
    coarse_index = {c: i for i, c in enumerate(coarse_ids)}
    coarse_names = {r["level1_id"]: r["level1_name"] for r in rows}
    return CategoryMap(
        fine_ids=[r["category_id"] for r in rows],
        coarse_ids=coarse_ids,
        fine_to_coarse=np.array([coarse_index[r["level1_id"]] for r in rows], np.int32),
        fine_names=[r["level2_name"] for r in rows],
        coarse_names=[coarse_names[c] for c in coarse_ids],
    )


def _read_rows(path):
    """The map's rows as {column: str}, each checked: every id present, no id twice, no stray field."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            _check_header(path, header)
            rows, line_of = [], {}
            for fields in reader:
                if fields:
                    rows.append(_check_row(path, reader.line_num, header, fields, line_of))
    except OSError as err:
        raise CategoryMapError(f"{path}: cannot read category map: {err}") from err
    except UnicodeDecodeError as err:
        raise CategoryMapError(f"{path}: not UTF-8 text (byte {err.start}): a category map is a UTF-8 CSV") from err
    except csv.Error as err:
        raise CategoryMapError(f"{path}: line {reader.line_num}: not a readable CSV row: {err}") from err
    if not rows:
        raise CategoryMapError(f"{path}: the category map lists no category")
    return rows


def _check_header(path, header):
    if header is None or any(col not in header for col in MAP_COLUMNS[:2]):
        raise CategoryMapError(f"{path}: a category map needs the columns {', '.join(MAP_COLUMNS)}")


def _check_row(path, line, header, fields, line_of):
    """One data row as {column: value} (names may be missing: ''), refused naming the line and field."""
    if len(fields) > len(header):
        raise CategoryMapError(f"{path}: line {line}: {len(fields)} fields, the header has {len(header)}")
    row = dict(zip(header, fields))
    for column in MAP_COLUMNS[:2]:
        if column not in row:
            raise CategoryMapError(f"{path}: line {line}: field '{column}' is missing")
        if not row[column].strip():
            raise CategoryMapError(f"{path}: line {line}: field '{column}' is empty")
    category_id = row["category_id"]
    if category_id in line_of:
        raise CategoryMapError(f"{path}: line {line}: category_id {category_id!r} is a duplicate "
                               f"(first on line {line_of[category_id]})")
    line_of[category_id] = line
    return {column: row.get(column, "") for column in MAP_COLUMNS}

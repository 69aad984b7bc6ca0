"""The small records every stage leaves beside its data: written atomically, read with a clear error,
and compared key by key.

    with atomic_path(path) as tmp: write tmp    # renamed onto path only when the block succeeds
    write_json(path, obj)                       # the same for a JSON record
    read_json(path, error=SomeError)            # names the file when it is missing or not JSON
    options_diff(old, new)                      # "a: 1 -> 2; enc.name: 'x' -> 'y'" (nested keys flattened)
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """Yield `path.tmp`; rename it onto `path` when the block ends without error, delete it otherwise,
    so a crash never leaves a half-written file under the real name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json(path, obj, **dump_options):
    """Write `obj` as JSON to `path` atomically."""
    dump_options.setdefault("indent", 1)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, **dump_options), encoding="utf-8")


def read_json(path, error=ValueError, hint=""):
    """The JSON in `path`; a missing or malformed file raises `error` naming the file (and `hint`)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}{'; ' + hint if hint else ''}") from err
    except json.JSONDecodeError as err:
        raise error(f"{path}: not valid JSON: {err}") from err


def options_diff(old, new):
    """'key: old -> new' for every differing leaf of two (nested) dicts, '; '-joined; '' when equal."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    return "; ".join(f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
                     for k in keys if flat_old.get(k) != flat_new.get(k))


def _flatten(config, prefix=""):
    flat = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

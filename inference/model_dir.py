"""The model directory (notes/CONTRACTS.md, "Model directory"): its manifest, written and verified.

    write_manifest(root)        # manifest.json: every other file with its sha256 and size
    model = open_model_dir(root)    # refuses a missing, altered or unlisted file, naming it
    model.model_json, model.stack_json, model.neural_dir, model.codebook_path, ...

Opening verifies every byte against the manifest before anything is loaded from it, so a fold model,
the stacker or the codebook is never used (or refitted) when it is not the one that was packaged.
"""
import hashlib
from dataclasses import dataclass
from pathlib import Path

from core.records import read_json, write_json

FORMAT, VERSION = "shortvideo-model", 1
MANIFEST = "manifest.json"
MODEL_JSON = "model.json"
CATEGORY_MAP = "category_map.csv"
CODEBOOK = "codebook.h5"
NEURAL, STACK = "neural", "stack"


class ModelDirError(ValueError):
    """A model directory that cannot be used: missing, altered or unlisted file, unreadable record."""


def file_digest(path, chunk=1 << 20):
    """(sha256 hex, size in bytes) of one file, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _files_under(root):
    """Relative POSIX paths of every file under root except the manifest, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)


def write_manifest(root):
    """Write ROOT/manifest.json listing every other file under ROOT with its sha256 and size."""
    root = Path(root)
    files = {}
    for rel in _files_under(root):
        sha, size = file_digest(root / rel)
        files[rel] = {"sha256": sha, "bytes": size}
    write_json(root / MANIFEST, {"format": FORMAT, "version": VERSION, "files": files})
    return files


def verify(root):
    """Check ROOT against its manifest; raises ModelDirError naming the first file missing, altered or
    not listed. Returns the manifest's file table."""
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"{root}: no model directory here; `python run.py stack` writes one to STACK_DIR/model")
    manifest = read_json(root / MANIFEST, ModelDirError, "not a model directory (written by `python run.py stack`)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelDirError(f"{root / MANIFEST}: field 'format' is not {FORMAT!r}; not a model directory")
    if manifest.get("version") != VERSION:
        raise ModelDirError(f"{root / MANIFEST}: field 'version' is {manifest.get('version')!r}, "
                            f"this code reads version {VERSION}; predict with the version of this package that "
                            "wrote it")
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ModelDirError(f"{root / MANIFEST}: field 'files' is missing")
    unlisted = [rel for rel in _files_under(root) if rel not in listed]
    if unlisted:
        raise ModelDirError(f"{root / unlisted[0]}: file not listed in {MANIFEST} "
                            f"({len(unlisted)} unlisted); the model directory was changed after it was written")
    for rel, entry in listed.items():
        _check_file(root, rel, entry)
    return listed


def _check_file(root, rel, entry):
    path = root / rel
    if not path.is_file():
        raise ModelDirError(f"{path}: listed in {MANIFEST} but missing; copy the whole model directory")
    sha, size = file_digest(path)
    if size != entry.get("bytes") or sha != entry.get("sha256"):
        raise ModelDirError(f"{path}: altered since it was packaged (sha256 {sha[:12]}, {size} bytes; "
                            f"{MANIFEST} says {str(entry.get('sha256'))[:12]}, {entry.get('bytes')} bytes)")


@dataclass
class ModelDir:
    """A verified model directory and its two records, each read once."""
    path: Path
    model_json: dict        # store identity, aggregate options, class order, models, signals
    stack_json: dict        # stack/stack.json as `stack` wrote it

    @property
    def neural_dir(self):
        return self.path / NEURAL

    @property
    def stack_dir(self):
        return self.path / STACK

    @property
    def category_map_path(self):
        return self.path / CATEGORY_MAP

    @property
    def codebook_path(self):
        """ROOT/codebook.h5, or None when the run had no aggregates."""
        return self.path / CODEBOOK if self.model_json.get("aggregates") is not None else None


def open_model_dir(root):
    """Verify ROOT against its manifest, then read model.json and stack/stack.json."""
    root = Path(root)
    verify(root)
    model_json = read_json(root / MODEL_JSON, ModelDirError)
    if not isinstance(model_json, dict) or model_json.get("format") != FORMAT:
        got = model_json.get("format") if isinstance(model_json, dict) else model_json
        raise ModelDirError(f"{root / MODEL_JSON}: field 'format' is {got!r:.60}, not {FORMAT!r}; not a model "
                            "directory's record")
    if model_json.get("version") != VERSION:
        raise ModelDirError(f"{root / MODEL_JSON}: field 'version' is {model_json.get('version')!r}, this code "
                            f"reads version {VERSION}; predict with the version of this package that wrote it")
    stack_json = read_json(root / STACK / "stack.json", ModelDirError)
    for key in ("store_identity", "dims", "fine_classes", "fine_to_coarse", "models", "signals"):
        if key not in model_json:
            raise ModelDirError(f"{root / MODEL_JSON}: field '{key}' is missing")
    return ModelDir(root, model_json, stack_json)

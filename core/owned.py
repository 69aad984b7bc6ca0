"""What a command may delete or replace: only files the project writes, recognised by their names.

    OwnedFiles(patterns).foreign(root)      # relative paths under ROOT that match none of the patterns
    OwnedFiles(patterns).refuse_foreign(root, error, what)   # raises `error` naming them
    OwnedFiles(patterns).clear(root)        # deletes the matching files, then the folders left empty
    check_apart(out, other, error, ...)     # OUT is not OTHER (e.g. --out is not the cache)

A pattern is a relative POSIX path whose segments are shell globs ("*/fold[0-9]*.json"); a "**" segment
stands for any number of segments. Every pattern also matches its name plus ".tmp", the atomic writes'
leftover of an interrupted run.
"""
import os
from fnmatch import fnmatchcase
from pathlib import Path

TMP = ".tmp"


def _matches(parts, pattern):
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _files_under(root):
    """Relative POSIX paths of every file (and link) under ROOT, sorted; links to folders are not followed."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        links = [d for d in dirs if (here / d).is_symlink()]
        for name in files + links:
            found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


class OwnedFiles:
    """The files one command writes under its output directory, as name patterns."""

    def __init__(self, patterns):
        self.patterns = [p.split("/") for p in patterns]

    def owns(self, rel):
        parts = rel.split("/")
        untmp = parts[:-1] + [parts[-1][: -len(TMP)]] if parts[-1].endswith(TMP) else None
        return any(_matches(parts, p) or (untmp and _matches(untmp, p)) for p in self.patterns)

    def foreign(self, root):
        """Relative paths under ROOT that this command does not write ([] when ROOT is absent)."""
        root = Path(root)
        return [rel for rel in _files_under(root) if not self.owns(rel)] if root.is_dir() else []

    def refuse_foreign(self, root, error, what):
        """Raise `error` naming the files under ROOT that `what` (a command) did not write."""
        foreign = self.foreign(root)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise error(f"{root}: holds {len(foreign)} file(s) {what} did not write ({shown}); it deletes or "
                        "replaces only its own files, so give it a directory of its own or move those away")

    def clear(self, root):
        """Delete the files under ROOT this command writes (call refuse_foreign first), then the folders
        left empty; ROOT itself stays."""
        root = Path(root)
        if not root.is_dir():
            return
        for rel in _files_under(root):
            if self.owns(rel):
                (root / rel).unlink()
        for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
            if Path(folder) != root and not any(Path(folder).iterdir()):
                Path(folder).rmdir()


def check_apart(out, other, error, out_flag="--out", other_name="cache directory"):
    """Refuse an output directory OUT that is OTHER (e.g. the feature cache): their files would mix. One that
    holds OTHER or lies inside it is left to refuse_foreign: only an --overwrite deletes, and only its own files."""
    if Path(out).resolve() == Path(other).resolve():
        raise error(f"{out}: {out_flag} is the {other_name}; give {out_flag} a directory of its own")

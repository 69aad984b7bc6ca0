"""Components from installed packages: a model, stacker or encoder from the user's own package is found
through Python entry points, and every saved file records which component (module, package, version)
made it, so one that is not installed here is refused naming it.

Entry-point groups (the name is the component's name; the object it points to):
    shortvideo.models          a module defining ENTRY (neural.models.base.ModelEntry), or the ModelEntry
    shortvideo.stackers        a stacking.stackers.base.Stacker subclass (its `kind` is its name)
    shortvideo.frame_encoders  a loader (spec, rest, device) -> features.encoders.FrameEncoder
    shortvideo.text_encoders   a loader (spec, rest, device) -> features.encoders.TextEncoder
"""
from importlib import metadata

PROJECT = "shortvideo-classifier"
GROUPS = {"models": "shortvideo.models", "stackers": "shortvideo.stackers",
          "frame_encoders": "shortvideo.frame_encoders", "text_encoders": "shortvideo.text_encoders"}


class ComponentError(ValueError):
    """An entry point that cannot be loaded, or a saved file made by a component not installed here."""


def _project_version():
    try:
        return metadata.version(PROJECT)
    except metadata.PackageNotFoundError:
        return "unknown"


def origin(obj, dist=None):
    """{"module", "package", "version"} of a component (a class, function or module); `dist` is the
    distribution an entry point came from, else this project."""
    module = obj.__name__ if hasattr(obj, "__path__") or type(obj).__name__ == "module" else obj.__module__
    if dist is None:
        return {"module": module, "package": PROJECT, "version": _project_version()}
    return {"module": module, "package": dist.name, "version": dist.version}


def installed(kind):
    """[(name, loaded object, origin)] of every entry point of group GROUPS[kind], sorted by name; one that
    fails to load is refused naming the entry point and its package."""
    out = []
    for ep in sorted(metadata.entry_points(group=GROUPS[kind]), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        try:
            obj = ep.load()
        except Exception as err:                              # a user's package: any import error
            package = f"{dist.name} {dist.version}" if dist is not None else "an installed package"
            raise ComponentError(f"entry point '{ep.name}' = {ep.value} of group {GROUPS[kind]} "
                                 f"(from {package}) cannot be loaded: {err}") from err
        out.append((ep.name, obj, origin(obj, dist)))
    return out


def describe(record):
    """'module M of package P V' for an origin record (or 'an unknown component' for none)."""
    if not isinstance(record, dict):
        return "an unknown component"
    return (f"module {record.get('module', '?')} of package {record.get('package', '?')} "
            f"{record.get('version', '?')}")


def not_installed(source, what, name, record):
    """The refusal for a saved file whose component is not installed: names the file, the component and
    where it came from."""
    return ComponentError(f"{source}: {what} '{name}' was made by {describe(record)}, which is not installed "
                          f"here; install that package (it registers group "
                          f"{GROUPS.get(what + 's', 'shortvideo.*')}) to use this file")

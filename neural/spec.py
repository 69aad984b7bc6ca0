"""ModelSpec: everything needed to rebuild a fold model before loading its tensors (the shared dims and
that model's own declared parameters), with a JSON round trip; written into each RUN_DIR/<model>/fold<k>.json.
A spec written before models declared their parameters (flat vlad_*/knn_* fields for every model) is read
into the new form: its own model's fields become its params, the others' are dropped."""
from dataclasses import MISSING, asdict, dataclass, field, fields

from core import schema


class SpecError(ValueError):
    """A model spec that is incomplete or malformed."""


@dataclass
class ModelSpec:
    model: str
    n_fine: int                        # C
    n_coarse: int                      # C1
    hidden: int                        # H
    n_layers: int
    n_heads: int
    dropout: float
    max_tokens: int                    # T kept (text tokens are also trimmed per batch)
    text_dim: int                      # Dt
    n_frames: int = 0                  # F; 0 when the model reads no frames
    frame_dim: int = 0                 # D; 0 when the model reads no frames
    aggregates: list = field(default_factory=list)         # agg/* dataset names the model reads (mlp)
    aggregate_widths: list = field(default_factory=list)   # their widths, same order
    params: dict = field(default_factory=dict)             # the model's own Params (neural/models/<model>.py)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values, source="spec"):
        """The spec in `values` (a dict from JSON); `source` (a file name) starts every error message."""
        if not isinstance(values, dict):
            raise SpecError(f"{source}: the model spec should be a JSON object, found {type(values).__name__}")
        values = _from_flat(values)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SpecError(f"{source}: unknown model spec field(s) {', '.join(unknown)}")
        missing = sorted(n for n, f in known.items()
                         if f.default is MISSING and f.default_factory is MISSING and n not in values)
        if missing:
            raise SpecError(f"{source}: model spec field(s) {', '.join(missing)} missing")
        for name, value in values.items():
            kind = _KINDS[known[name].type]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise SpecError(f"{source}: model spec field '{name}' should be {known[name].type.__name__}, found {value!r:.60}")
        return cls(**values)


_KINDS = {str: str, int: int, float: (int, float), list: list, dict: dict}   # JSON writes 1.0 as 1.0, but accept 1


def _from_flat(values):
    """An old spec's flat per-model fields (the entries' `legacy` names) moved into `params`: its own model's
    kept, other models' dropped."""
    from neural.models import lift_legacy        # the registry imports the models, which do not import this
    return lift_legacy(values, lambda model, name, value: name if model == values.get("model") else None)


def spec_from_store(model, reader, options, names, codebook=None):
    """The spec of `model` reading datasets `names` of this store, with `options` (NeuralOptions, whose
    `params` overrides the model's declared defaults); a model initialised from a cache file completes
    its params from it (vlad: its pooling's sizes from the codebook)."""
    from neural.models import model_entry, model_params
    params = model_entry(model).cls.params_from_cache(model_params(model, options.params), codebook)
    h5 = reader.h5
    text = schema.TEXT_TOKENS if schema.TEXT_TOKENS in names else schema.TEXT_POOLED
    spec = ModelSpec(model=model, n_fine=len(reader.fine_classes), n_coarse=len(reader.coarse_classes),
                     hidden=options.hidden, n_layers=options.n_layers, n_heads=options.n_heads,
                     dropout=options.dropout, max_tokens=options.max_tokens, text_dim=int(h5[text].shape[-1]),
                     params=asdict(params))
    if schema.FRAME_EMB in names:
        spec.n_frames, spec.frame_dim = (int(v) for v in h5[schema.FRAME_EMB].shape[1:])
    spec.aggregates = [n for n in names if n.startswith(schema.AGG_GROUP + "/")]
    spec.aggregate_widths = [int(h5[n].shape[1]) for n in spec.aggregates]
    return spec

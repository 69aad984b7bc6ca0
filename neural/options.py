"""Options of a `train-neural` run: one plain dataclass, recorded in run.json and every predictions.h5.
The model names are the registry's (neural/models/__init__.py); a model's own parameters are declared in
its module (its Params) and set here through `params` ({"[model.]name": value}, `--param`)."""
from dataclasses import asdict, dataclass, field, fields

class OptionsError(ValueError):
    """Options of a train-neural run that cannot be used (unknown, out of range)."""


RUNTIME_ONLY = ("num_workers", "threads", "splits")     # do not change what a fold model learns


@dataclass
class NeuralOptions:
    n_folds: int = 5
    seed: int = 0
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.1          # of all steps; then cosine decay to zero
    hidden: int = 128                 # H, width of every model
    n_layers: int = 1                 # transformer layers per stack (single, dual, cross)
    n_heads: int = 4
    dropout: float = 0.2
    max_tokens: int = 64              # text tokens kept (T is also trimmed per batch to the longest)
    coarse_weight: float = 0.5        # auxiliary coarse-head loss weight (multi-task)
    params: dict = field(default_factory=dict)   # models' own parameters: {"[model.]name": value} over
                                      # their declared defaults (neural/models/<model>.py Params)
    # regularisers, each measured by `python -m bench train_neural options` (fashion, masked titles): only
    # class-balanced weights helped clearly (+0.008..+0.026 OOF mean-F1, via macro-F1); the others moved
    # it by less than the fold noise (about 0.005) or hurt, so they are off by default
    label_smoothing: float = 0.0
    class_balanced: bool = True       # loss weights (1 - beta) / (1 - beta ** n_c), Cui et al. 2019
    balance_beta: float = 0.999
    ema: bool = False                 # evaluate and predict with an exponential moving average of weights
    ema_decay: float = 0.995
    fgm: bool = False                 # adversarial step on the input embeddings (Miyato et al.)
    fgm_eps: float = 0.05             # perturbation norm, relative to each input row's norm
    rdrop: bool = False               # two dropout passes + symmetric KL (Liang et al. 2021)
    rdrop_alpha: float = 1.0
    # self-supervised pretraining of the token/frame models on every store in the cache (neural/pretrain.py)
    pretrain: bool = False
    pretrain_epochs: int = 4          # passes over every store in the cache, once per pretrainable model
    pretrain_mask_ratio: float = 0.15 # real frames / tokens replaced by a learned mask vector
    pretrain_mfm: float = 1.0         # weight of masked frame modelling (InfoNCE over the batch's masked frames)
    pretrain_mtm: float = 1.0         # weight of masked token-state modelling (the same on text_tokens)
    pretrain_vtm: float = 1.0         # weight of video-text matching (half the pairs get another video's frames)
    pretrain_vtc: float = 1.0         # weight of video-text contrastive alignment of the pooled states
    # pseudo-label distillation from the unlabelled split (neural/pseudo.py); off without a teacher
    unlabeled: str = ""               # unlabelled split; "" = CACHE_DIR/unlabeled.h5 when the cache has one
    teacher: str = ""                 # RUN_DIR or STACK_DIR whose fold-k models pseudo-label for fold k; "" = none
    pseudo_weight: float = 1.0        # weight of the distillation loss beside the labelled loss
    pseudo_temperature: float = 2.0   # T of KL(teacher_T || student_T), times T^2
    pseudo_threshold: float = 0.5     # unlabelled rows whose teacher max-probability is lower are not used
    pseudo_ratio: float = 1.0         # unlabelled rows per step, as a multiple of batch_size
    pseudo_finetune_epochs: int = 1   # then epochs on labelled rows only (on top of epochs)
    pseudo_modality_drop: float = 0.0 # share of pseudo-labelled rows that lose their text or frames (consistency)
    groups: str = "auto"              # CSV id,group: folds never split a group (neural/folds.py); "auto":
                                      # near-duplicate groups found in the features (neural/neardup.py),
                                      # used when the data has them; "none" (or ""): stratified folds
    num_workers: int = 0              # DataLoader workers; each opens its own store handle
    threads: int = 0                  # torch CPU threads; 0 leaves torch's default
    splits: tuple = ()                # other splits to predict; () = every other store in CACHE_DIR

    def result_dict(self):
        """The options that can change the predictions (compared when a run is resumed)."""
        out = self.to_dict()
        for name in RUNTIME_ONLY:
            out.pop(name)
        return out

    def to_dict(self):
        out = asdict(self)
        out["splits"] = list(self.splits)
        return out

    @classmethod
    def from_dict(cls, values):
        values = _from_flat(values)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise OptionsError(f"unknown neural options: {', '.join(sorted(unknown))}")
        values = dict(values)
        if "splits" in values:
            values["splits"] = tuple(values["splits"])
        return cls(**values)

    def check(self):
        if self.n_folds < 2:
            raise OptionsError(f"n_folds must be at least 2, got {self.n_folds}")
        if self.pretrain_epochs < 1 or not 0 < self.pretrain_mask_ratio < 1:
            raise OptionsError(f"pretrain_epochs must be >= 1 and pretrain_mask_ratio in (0, 1), got "
                               f"{self.pretrain_epochs} and {self.pretrain_mask_ratio}")
        weights = {n: getattr(self, f"pretrain_{n}") for n in ("mfm", "mtm", "vtm", "vtc")}
        if min(weights.values()) < 0 or not any(weights.values()):
            raise OptionsError(f"pretrain objective weights must be >= 0, at least one above 0, got {weights}")
        if self.pseudo_weight < 0 or self.pseudo_temperature <= 0 or not 0 <= self.pseudo_threshold < 1 \
                or self.pseudo_ratio <= 0 or self.pseudo_finetune_epochs < 0 or not 0 <= self.pseudo_modality_drop <= 1:
            raise OptionsError(f"pseudo_weight must be >= 0, pseudo_temperature > 0, pseudo_threshold in [0, 1), "
                               f"pseudo_ratio > 0, pseudo_finetune_epochs >= 0 and pseudo_modality_drop in [0, 1], "
                               f"got {self.pseudo_weight}, {self.pseudo_temperature}, {self.pseudo_threshold}, "
                               f"{self.pseudo_ratio}, {self.pseudo_finetune_epochs} and {self.pseudo_modality_drop}")
        if self.hidden % self.n_heads:
            raise OptionsError(f"hidden ({self.hidden}) must be a multiple of n_heads ({self.n_heads})")
        return self


def _from_flat(values):
    """Options recorded before models declared their parameters (flat vlad_pooling, knn_k, ...): each
    such field becomes "model.name" in params, left out at its declared default, so an old run resumes
    and compares equal to the same options given today."""
    from neural.models import lift_legacy, model_entry
    return lift_legacy(values, lambda model, name, value:
                       None if value == getattr(model_entry(model).Params(), name) else f"{model}.{name}")

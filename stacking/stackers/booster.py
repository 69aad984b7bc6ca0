"""LightGBM settings and booster files shared by the boosted stackers (lgbm, rerank); not a stacker.

lightgbm is imported on use: importing it costs ~2 s, which every `run.py` command would pay for the
stackers' help text otherwise.
"""
from core.records import atomic_path
from stacking.stackers.base import StackerError

BOOSTER_FILE = "booster.txt"


def lgb_params(objective, stacker, extra=None):
    """LightGBM's parameter dict from a boosted stacker's parameters (deterministic, row-wise, silent)."""
    out = {"objective": objective, "learning_rate": stacker.learning_rate, "num_leaves": stacker.num_leaves,
           "min_data_in_leaf": stacker.min_data_in_leaf, "feature_fraction": stacker.feature_fraction,
           "lambda_l2": stacker.lambda_l2, "max_bin": stacker.max_bin, "num_threads": stacker.threads,
           "seed": stacker.seed, "deterministic": True, "force_row_wise": True, "verbose": -1}
    out.update(extra or {})
    return out


def train(params, features, label, n_rounds, categorical=()):
    """A booster trained on features (N, F) and label (N,) for n_rounds."""
    import lightgbm as lgb
    data = lgb.Dataset(features, label=label, categorical_feature=list(categorical) or "auto",
                       free_raw_data=True)
    return lgb.train(params, data, num_boost_round=n_rounds)


def save_booster(booster, path):
    with atomic_path(path / BOOSTER_FILE) as tmp:
        booster.save_model(str(tmp))


def load_booster(path):
    import lightgbm as lgb
    file = path / BOOSTER_FILE
    if not file.exists():
        raise StackerError(f"{file}: missing; the saved stacker is incomplete")
    return lgb.Booster(model_file=str(file))

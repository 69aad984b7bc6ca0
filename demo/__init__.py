"""`python run.py demo`: generated challenge-layout data with known signals (synthetic.py), then the whole
pipeline on it (run.py): extract -> train-neural -> stack, its table and per-kind accuracy."""


class DemoError(ValueError):
    """A demo that cannot run as asked (generator sizes, fold count, a submission missing videos)."""

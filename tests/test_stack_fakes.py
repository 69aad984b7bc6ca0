"""Moved to tests/fake_runs.py (a helper, not a test module); this name stays until the last import of it
(tests/test_bad_input.py) moves there too."""
from tests.fake_runs import fake_proba, softmax, write_fake_run, write_predictions  # noqa: F401

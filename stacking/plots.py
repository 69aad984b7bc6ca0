"""Per-class F1 against class frequency, before and after the long-tail reweighting."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)
import numpy as np  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402


def plot_per_class_f1(path, y, pred_before, pred_after, counts, name):
    """Scatter of each present class's out-of-fold F1 against its labelled count (log scale)."""
    labels = np.where(counts > 0)[0]
    before = f1_score(y, pred_before, labels=labels, average=None, zero_division=0)
    after = f1_score(y, pred_after, labels=labels, average=None, zero_division=0)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(counts[labels], before, s=14, alpha=0.6, label=f"{name}")
    ax.scatter(counts[labels], after, s=14, alpha=0.6, marker="x", label=f"{name} + reweighting")
    ax.axvline(np.percentile(counts[labels], 25), color="grey", lw=0.8, ls="--", label="lowest-quartile cut")
    ax.set_xscale("log")
    ax.set_xlabel("labelled videos of the class")
    ax.set_ylabel("out-of-fold F1 (fine class)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

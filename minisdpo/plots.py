"""The pictures of a run: training curves from ``OUT/metrics.jsonl`` and the models' metrics.

``write_plots(out)`` draws ``OUT/plots/<stage>.png`` (each curve raw and faint behind its moving
average, the validation loss as points); ``plot_results(out, summary)`` draws
``OUT/plots/results.png`` (the models' HR@1, ValidRatio and ranking metrics as grouped bars, the
baselines hatched).
Both do nothing when matplotlib is not installed.
"""
from __future__ import annotations

import json
from pathlib import Path

from minisdpo.loss import start_loss
from minisdpo.run import STAGES

__all__ = ["write_plots", "plot_results"]


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points: the trend of a noisy per-step curve."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(out: Path) -> None:
    """PNG plots of the training curves from metrics.jsonl (skipped when matplotlib is absent):
    per stage, each curve raw (faint) behind its moving average, and the validation loss points;
    for S-DPO and DPO the validation curve starts at step 0 from ln(1 + K), where the adapter
    starts, and dashed lines mark that loss and the chance accuracy 1 / (1 + K)."""
    path = out / "metrics.jsonl"
    plt = _pyplot()
    if not path.exists() or plt is None:
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    (out / "plots").mkdir(exist_ok=True)
    for stage in STAGES:
        # A preference adapter starts as the identity (LoRA B = 0): the policy is the reference
        # model, every reward is 0, the loss is ln(1 + K) and 1 / (1 + K) is the chance accuracy.
        negatives = 1 if stage == "dpo" else config.get("negatives")
        start = ({"loss": start_loss(negatives), "rewards/accuracies": 1 / (1 + negatives)}
                 if stage != "sft" and negatives else {})
        train = [r for r in records if r["stage"] == stage and "loss" in r]
        val = [r for r in records if r["stage"] == stage and "val_loss" in r]
        if not train:
            continue
        keys = ["loss"] + [k for k in ("rewards/accuracies", "rewards/margins") if k in train[0]]
        window = max(1, len(train) // 10)
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            steps, values = [r["step"] for r in train], [r[key] for r in train]
            line, = ax.plot(steps, values, alpha=0.25, linewidth=1)
            ax.plot(steps, _moving_average(values, window), color=line.get_color(),
                    label=f"train (mean of {window})")
            if key in start:
                ax.axhline(start[key], color="gray", linestyle="--", linewidth=1,
                           label="policy = reference" if key == "loss" else "chance")
            if key == "loss" and val:
                first = [(0, start["loss"])] if "loss" in start else []
                points = first + [(r["step"], r["val_loss"]) for r in val]
                ax.plot(*zip(*points), "o-", label="validation")
            ax.legend()
            ax.set_xlabel("step")
            ax.set_title(f"{stage}: {key}")
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{stage}.png", dpi=100)
        plt.close(fig)


def plot_results(out: Path, summary: dict) -> None:
    """OUT/plots/results.png: the models' metrics side by side, as grouped bars."""
    plt = _pyplot()
    if plt is None:
        return
    models = list(summary["models"])
    cols = [c for c in ("hr@1", "valid_ratio", "rank_hr@1", "rank_hr@5", "rank_ndcg@5")
            if all(c in summary["models"][m] for m in models)]
    (out / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.5))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(cols))]
        values = [summary["models"][m][c] for c in cols]
        # Baselines (not language models: summary["baselines"]) hatched, apart from the models.
        bars = ax.bar(xs, values, width, label=m, hatch="//" if m in summary.get("baselines", {}) else None)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    split = "test" if "test_rows" in summary else "val"
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{split} split, {summary[split + '_rows']} rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "results.png", dpi=100)
    plt.close(fig)

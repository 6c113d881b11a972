"""PNG plots for evaluation reports (matplotlib, Agg backend: no display needed).

* :func:`student_vs_teacher` — accuracy bars with 95% intervals, teacher first;
* :func:`score_vs_examples` — accuracy against the number of training examples, one line per
  series (e.g. SFT and top-k KD), with the teacher's score as a band.

Both take plain numbers (:class:`~stillhouse.distill.metrics.Estimate`), so an experiment
script can call them with its own series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stillhouse.distill.metrics import Estimate


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'stillhouse[train]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(labels: Sequence[str], estimates: Sequence[Estimate], path: str | Path, *,
         title: str = "", ylabel: str = "accuracy", highlight_first: bool = True) -> Path:
    """A bar per estimate with its interval as an error bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 3.8), dpi=120)
    xs = list(range(len(labels)))
    vals = [e.value for e in estimates]
    err = [[max(0.0, e.value - e.lo) for e in estimates], [max(0.0, e.hi - e.value) for e in estimates]]
    colors = ["#555555" if (i == 0 and highlight_first) else "#3b7dd8" for i in xs]
    ax.bar(xs, vals, yerr=err, capsize=4, color=colors)
    for x, e in zip(xs, estimates):
        ax.text(x, min(1.0, e.hi) + 0.02, f"{e.value:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "accuracy (95% CI)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def student_vs_teacher(result: Any, path: str | Path) -> Path:
    """Bars for an :class:`~stillhouse.distill.evaluate.EvalResult`: the teacher, then each student."""
    models = [result.teacher, *result.students]
    return bars([m.label for m in models], [m.accuracy for m in models], path,
                title=f"{result.task}: accuracy, n={len(result.item_ids)} (95% CI)")


def score_vs_examples(series: Mapping[str, Sequence[tuple[int, Estimate]]], path: str | Path, *,
                      teacher: Estimate | None = None, title: str = "", log_x: bool = True) -> Path:
    """Accuracy against training-set size; ``series`` maps a name to ``(n_examples, Estimate)`` points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, points in series.items():
        pts = sorted(points, key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[0] for p in pts]
        ys = [p[1].value for p in pts]
        err = [[max(0.0, p[1].value - p[1].lo) for p in pts], [max(0.0, p[1].hi - p[1].value) for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
    if teacher is not None:
        ax.axhline(teacher.value, color="#555555", linestyle="--", label=f"teacher {teacher.value:.2f}")
        ax.axhspan(teacher.lo, teacher.hi, color="#555555", alpha=0.12)
    xs_all = sorted({p[0] for pts in series.values() for p in pts})
    if log_x and xs_all and xs_all[0] > 0:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    if xs_all:  # label the sizes actually trained on, as plain numbers
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:,}" for x in xs_all])
    ax.set_xlabel("training examples")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "accuracy vs training examples (95% CI)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out

"""Plots with matplotlib, written straight to PNG (a Figure and its Agg canvas: no pyplot, no
display, no global backend switch), atomically like every file nanollava writes.

  training_curves(records, path)  one run's metrics.jsonl: loss (raw and smoothed), learning rate,
                                  gradient norm, tokens/s, each against the optimizer step
  bars(table, path)               an eval table, {model: {metric: value}}: grouped bars, the value
                                  on each, and the published numbers as markers when given
"""
from matplotlib.figure import Figure

from nanollava import files

# metrics.jsonl key -> the axis label; a panel is drawn for each key the records have
CURVES = [("loss", "loss (next-token cross-entropy)"), ("lr", "learning rate"),
          ("grad_norm", "gradient norm (before clipping)"), ("tokens_per_s", "tokens / s")]


def smooth(values, span=None):
    """Exponential moving average with TensorBoard's bias correction (the first points are not
    pulled towards 0). span (default: a twentieth of the run, at least 1) is the averaging window."""
    span = span or max(1, len(values) // 20)
    weight, avg, out = 1 - 1 / span, 0.0, []
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i) if weight else v)
    return out


def _save(fig, path):
    with files.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def training_curves(records, path, title="training"):
    """records: metrics.jsonl rows (step, loss, lr, grad_norm, tokens_per_s; missing keys are left
    out) -> a grid of panels against the optimizer step, saved to `path`; returns the Figure."""
    panels = [(key, label) for key, label in CURVES if any(key in r for r in records)]
    if not panels:
        raise ValueError(f"no {' / '.join(k for k, _ in CURVES)} in the records to plot")
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.4 * rows), layout="constrained")
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        rs = [r for r in records if key in r and r[key] is not None]
        steps, values = [r["step"] for r in rs], [r[key] for r in rs]
        if key == "loss":
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
            ax.plot(steps, smooth(values), color="tab:blue", linewidth=2, label="smoothed (EMA)")
            ax.legend(frameon=False)
        else:
            ax.plot(steps, values, color={"lr": "tab:green", "grad_norm": "tab:red"}.get(key, "tab:purple"))
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(steps) == 1:                      # one step: a visible point, not an empty line
            ax.plot(steps, values, "o", color="tab:blue")
    fig.suptitle(title)
    _save(fig, path)
    return fig


def bars(table, path, title="", ylabel="score (%)", reference=None, reference_label="published"):
    """table: {series: {metric: value}} -> one group of bars per metric, one bar per series, the
    value written on each bar; reference: {metric: value} drawn as black markers. Returns the Figure."""
    series = list(table)
    metrics = [m for m in dict.fromkeys(k for s in series for k in table[s])]
    if not metrics:
        raise ValueError("nothing to plot: the table has no values")
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(5.0, 1.3 * len(metrics) * max(1, len(series) / 2) + 1.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        xs = [m + (i - (len(series) - 1) / 2) * width for m in range(len(metrics))]
        ys = [table[s].get(k, 0.0) for k in metrics]
        rects = ax.bar(xs, ys, width, label=s)
        ax.bar_label(rects, fmt="%.1f", fontsize=8, padding=2)
    ref = [(m, reference[k]) for m, k in enumerate(metrics) if k in (reference or {})]
    if ref:
        ax.plot([m for m, _ in ref], [v for _, v in ref], "k_", markersize=30, markeredgewidth=2,
                label=reference_label)
    ax.set_xticks(range(len(metrics)), metrics, rotation=20 if len(metrics) > 4 else 0, ha="right"
                  if len(metrics) > 4 else "center")
    ax.set_ylabel(ylabel)
    top = max([table[s].get(k, 0.0) for s in series for k in metrics] + [v for _, v in ref])
    ax.set_ylim(0, top * 1.15 or 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    ax.set_title(title)
    _save(fig, path)
    return fig

"""nanollava/plots.py: the training curves and the eval bars are real, labelled matplotlib plots."""

import pytest
from PIL import Image

from nanollava import plots


def _records(n=60):
    return [dict(step=s, loss=3.0 / s + (0.2 if s % 2 else 0.0), lr=1e-3 * min(1, s / 5), grad_norm=1 + 1 / s,
                 tokens_per_s=1000.0 + s) for s in range(1, n + 1)]


def test_training_curves_have_four_labelled_panels_and_a_smoothed_loss(tmp_path):
    fig = plots.training_curves(_records(), tmp_path / "loss.png", "stage 2")
    axes = fig.get_axes()
    assert [a.get_ylabel() for a in axes] == ["loss (next-token cross-entropy)", "learning rate",
                                              "gradient norm (before clipping)", "tokens / s"]
    assert all(a.get_xlabel() == "optimizer step" for a in axes)
    assert [line.get_label() for line in axes[0].get_lines()] == ["raw", "smoothed (EMA)"]
    assert len(axes[0].get_yticklabels()) > 2, "the loss axis has ticks"
    with Image.open(tmp_path / "loss.png") as img:
        assert img.format == "PNG" and img.width > 800


def test_training_curves_draw_what_the_records_have(tmp_path):
    """pretrain_toy.py logs loss and lr only; a one-step run still draws its point."""
    fig = plots.training_curves([dict(step=1, loss=2.0, lr=1e-3)], tmp_path / "a.png")
    assert [a.get_ylabel() for a in fig.get_axes()] == ["loss (next-token cross-entropy)", "learning rate"]
    with pytest.raises(ValueError, match="no loss / lr"):
        plots.training_curves([dict(step=1)], tmp_path / "b.png")


def test_smooth_is_a_bias_corrected_ema():
    assert plots.smooth([2.0] * 50) == pytest.approx([2.0] * 50), "a constant stays constant from the start"
    assert plots.smooth([0.0, 10.0], span=2) == pytest.approx([0.0, 10 * 0.5 / 0.75])   # (0.5*0 + 0.5*10)/(1-0.25)
    assert plots.smooth([1.0, 5.0], span=1) == [1.0, 5.0]


def test_bars_have_a_bar_per_model_and_metric_and_the_published_marker(tmp_path):
    table = {"stage 1": {"acc": 36.3, "F1": 0.0}, "stage 2": {"acc": 96.3, "F1": 95.3}}
    fig = plots.bars(table, tmp_path / "bars.png", "toy", reference={"acc": 90.0}, reference_label="published")
    ax = fig.get_axes()[0]
    assert len(ax.patches) == 4 and ax.get_ylabel() == "score (%)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["acc", "F1"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(["36.3", "0.0", "96.3", "95.3"])
    assert "published" in [h.get_label() for h in ax.get_legend().legend_handles]
    assert (tmp_path / "bars.png").stat().st_size > 1000

"""The loss chart (lora.scoring.plots.loss_figure, behind logs/loss_curve.png, report.html and the
web UI's Train tab)."""

from __future__ import annotations


def test_the_loss_curve_restarts_where_the_held_out_clips_changed():
    """The held-out curve is split at a resume that changed the held-out clips (and the base
    measured there is no point of it)."""
    from lora.scoring.plots import loss_figure

    history = [{"step": 0, "val_loss": 7.0, "base": True}, {"step": 1, "loss": 6.5},
               {"step": 2, "val_loss": 6.0},
               {"step": 2, "event": "resume", "heldout_changed": True, "train_data_changed": True},
               {"step": 2, "val_loss": 9.0, "base": True}, {"step": 2, "val_loss": 8.9},
               {"step": 4, "val_loss": 8.5}]
    fig = loss_figure(history, 9.0)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    old = lines["held-out loss (earlier held-out clips)"]
    assert list(old.get_xdata()) == [0, 2] and list(old.get_ydata()) == [7.0, 6.0]
    new = lines["held-out loss"]
    assert list(new.get_xdata()) == [2, 4] and list(new.get_ydata()) == [8.9, 8.5]
    vertical = [ln for ln in fig.axes[0].get_lines() if list(ln.get_xdata()) == [2, 2]]
    assert vertical, "the resume that changed the data is marked"


def test_one_training_point_is_visible():
    """A run with one logged training step: a line of one point is invisible, so it gets a marker
    (today's main draws nothing)."""
    from lora.scoring.plots import loss_figure

    fig = loss_figure([{"step": 0, "val_loss": 7.0, "base": True}, {"step": 1, "loss": 6.5},
                       {"step": 1, "val_loss": 6.9}])
    train = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "train loss")
    assert len(train.get_xdata()) == 1
    assert train.get_marker() not in (None, "None", "", " ") and train.get_markersize() > 0
    fig = loss_figure([{"step": 1, "loss": 6.5}, {"step": 2, "loss": 6.4}])
    train = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "train loss")
    assert train.get_linestyle() == "-"

"""Evaluation outputs: the falling-chosen diagnostic on constructed eval histories, and its mark on the plots."""

import pytest

from dpo_jax.training import evaluate, outputs


def _row(step, chosen, rejected, margin):
    return {"step": step, "eval/logratio/chosen_per_token": chosen, "eval/logratio/rejected_per_token": rejected,
            "eval/rewards/margins": margin}  # fmt: skip


@pytest.mark.parametrize(
    "rows,fires_at",
    [
        # the reference (all 0), then both fall with the rejected faster: the margin rises -> fires at step 200
        ([_row(0, 0.0, 0.0, 0.0), _row(100, 0.05, -0.2, 0.3), _row(200, -0.4, -1.1, 0.7)], 200),
        # chosen rises, rejected falls: the healthy case -> silent
        ([_row(0, 0.0, 0.0, 0.0), _row(100, 0.2, -0.5, 0.7), _row(200, 0.3, -0.9, 1.2)], None),
        # chosen falls but so does the margin (the policy gets worse at the task, not displacement) -> silent
        ([_row(0, 0.0, 0.0, 0.0), _row(100, -0.3, -0.1, -0.2)], None),
        # float noise around the reference -> silent
        ([_row(0, -1e-5, 2e-5, 1e-5)], None),
    ],
)
def test_falling_chosen_fires_where_it_must_and_only_there(rows, fires_at):
    fired = [r["step"] for r in rows if evaluate.falling_chosen(r)]
    assert (fired[0] if fired else None) == fires_at
    if fires_at is not None:
        message = evaluate.falling_chosen(rows[-1])
        assert f"step {fires_at}" in message and "-0.4 nats per token" in message and evaluate.SFT_HINT in message
        with_sft = evaluate.falling_chosen(rows[-1], sft_weight=0.2)
        assert "Raise the SFT term's weight (now 0.2)" in with_sft and evaluate.SFT_HINT not in with_sft


def test_plots_mark_where_the_diagnostic_fired(tmp_path):
    history = [
        {"step": 0, "eval/loss": 0.69, "eval/logratio/chosen_per_token": 0.0},
        {"step": 10, "train/loss": 0.6, "train/logratio/chosen_per_token": -0.1},
        {"step": 20, "eval/loss": 0.5, "eval/logratio/chosen_per_token": -0.3},
        {"step": 20, evaluate.FALLING_CHOSEN: -0.3},
    ]
    titles = [t for t, _ in outputs.plot_panels(history)]
    assert "log pi - log pi_ref per token" in titles
    assert outputs.write_plots(history, {}, tmp_path / "plots.png").stat().st_size > 0

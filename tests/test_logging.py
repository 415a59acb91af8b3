"""Writers: JSONL rewinds on resume (no step twice), W&B falls back to offline at once, the bar shows current values."""

import io
import socket

import ml_collections

from dpo_jax.infra.logging import ConsoleWriter, JsonlWriter, WandbWriter, read_jsonl


def test_rewind_drops_redone_steps_and_a_line_cut_short(tmp_path):
    w = JsonlWriter(tmp_path / "metrics.jsonl")
    for step in (5, 10, 15, 20):
        w.write(step, {"train/loss": step / 10})
    w.write(10, {"eval/loss": 0.5})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 25, "train/lo')  # a kill in the middle of a write
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [5, 10, 15, 20, 10]
    w.rewind(10)  # resumed from the checkpoint of step 10: 15, 20 (and the cut line) will be redone
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 5, "train/loss": 0.5}, {"step": 10, "train/loss": 1.0}, {"step": 10, "eval/loss": 0.5}
    ]  # fmt: skip
    w.rewind(10, keep_evals=False)  # the eval of step 10 was interrupted and will be redone
    assert [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/loss" in r] == []
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_rewind_forgets_only_its_own_stages_rows(tmp_path):
    """An SFT stage redone from an older checkpoint keeps the DPO rows; a DPO stage that restarts at step 0 (no
    checkpoint yet) drops its step-0 eval, which it redoes, and keeps the SFT stage's last row at that step."""
    w = JsonlWriter(tmp_path / "metrics.jsonl")
    for step in (5, 10):
        w.write(step, {"sft/loss": 1.0 / step})
    w.write(10, {"eval/loss": 0.7})  # the DPO stage's step 0 (logged after the 10 SFT steps)
    w.write(15, {"train/loss": 0.6})
    w.rewind(5, stage="sft")  # the SFT checkpoint of step 10 was damaged: steps 6-10 are redone
    assert [(r.pop("step"), *r) for r in read_jsonl(w.path)] == [
        (5, "sft/loss"), (10, "eval/loss"), (15, "train/loss")
    ]  # fmt: skip
    w.write(10, {"sft/loss": 0.1})
    w.rewind(10, stage="dpo", keep_evals=False)
    assert [(r.pop("step"), *r) for r in read_jsonl(w.path)] == [(5, "sft/loss"), (10, "sft/loss")]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_wandb_online_without_a_server_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")  # nothing listens there
    cfg = ml_collections.ConfigDict(dict(project="p", entity="", group="", tags=(), name="", mode="offline"))
    w = WandbWriter(cfg, tmp_path, {"a": 1}, job_type="train")
    w.write(1, {"train/loss": 0.7})
    w.close()
    err = capsys.readouterr().err
    assert err.count("W&B server unreachable; logging offline instead") == 1 and "wandb sync" in err
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_progress_bar_shows_the_values_of_the_step_it_reaches():
    out = io.StringIO()
    bar = ConsoleWriter(20, 0, "dpo", file=out, mininterval=0)
    bar.write(10, {"train/loss": 0.611})
    assert out.getvalue().rstrip().split("\r")[-1].find("loss=0.611") > 0
    bar.write(20, {"train/loss": 0.422})
    last = out.getvalue().rstrip().split("\r")[-1]
    assert "20/20" in last and "loss=0.422" in last
    bar.close()

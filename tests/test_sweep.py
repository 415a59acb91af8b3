"""Sweeps: declaration, sequential members sharing one compile, SFT stage and reference cache; export."""

import csv
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import tiny_config

from dpo_jax import sweep, train
from dpo_jax.config import ConfigError
from dpo_jax.evaluate import read_history

ROOT = Path(__file__).resolve().parents[1]


def test_grid_and_member_names():
    members = sweep.grid({"dpo.beta": [0.1, 0.3], "dpo.label_smoothing": [0.0, 0.2]})
    assert len(members) == 4 and members[1] == {"dpo.beta": 0.1, "dpo.label_smoothing": 0.2}
    assert sweep.member_name(members[1]) == "beta=0.1,label_smoothing=0.2"


def test_unknown_member_key_is_an_error():
    with pytest.raises(ConfigError, match="'dpo.betta'"):
        sweep.apply_overrides(tiny_config(), {"dpo.betta": 0.1})


def test_shipped_sweeps_declare_valid_members():
    for spec in ("configs/beta_sweep.py", "configs/label_softness_sweep.py"):
        base, members = sweep.load_sweep(str(ROOT / spec))
        assert len(members) >= 4
        for m in members:
            sweep.apply_overrides(base, m)


MEMBERS = [
    {"dpo.beta": 0.03},
    {"dpo.beta": 0.3, "optim.learning_rate": 6e-4},
    {"dpo.label_smoothing": 0.2},
    {"dpo.soft_target_temperature": 0.3, "dpo.seed": 7},  # its own data order: a [K, B, ...] batch when vectorised
]
SPEC = str(ROOT / "configs/beta_sweep.py:runlocal")


def _base():
    return tiny_config(
        "optim.steps=8",
        "eval.every=100",
        "log_every=2",
        "wandb.enabled=True",
        "eval.num_prompts=8",
        "dpo.use_soft_targets=True",
    )


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seq")
    before = len(train._STEP_FNS)
    rows = sweep.run_sweep(SPEC, workdir, base=_base(), members=MEMBERS, devices=jax.devices()[:1])
    return workdir, rows, len(train._STEP_FNS) - before


def test_sequential_sweep_shares_compile_sft_and_reference_and_resumes(sequential, capsys):
    workdir, rows, new_steps = sequential
    assert [r["member"] for r in rows] == [sweep.member_name(m) for m in MEMBERS]
    assert [r["dpo.beta"] for r in rows] == [0.03, 0.3, 0.1, 0.1]  # effective values, base filled in
    # SFT + DPO step, and one more DPO step for the member with another learning rate (a static schedule).
    assert new_steps == 3
    assert len(list((workdir / "_shared").iterdir())) == 1 and not (workdir / rows[1]["member"] / "sft").exists()
    assert all(train.load_summary(workdir / r["member"])["reference/cache_hit"] for r in rows[1:])
    assert rows[0]["eval/rewards/margins"] != rows[1]["eval/rewards/margins"]  # beta really differs
    with (workdir / "summary.csv").open() as f:
        assert [r["member"] for r in csv.DictReader(f)] == [r["member"] for r in rows]
    assert (workdir / "sweep.png").exists()
    capsys.readouterr()
    sweep.run_sweep(SPEC, workdir, base=_base(), members=MEMBERS, devices=jax.devices()[:1])
    assert capsys.readouterr().out.count("finished, skipped") == len(MEMBERS)
    hist = [read_history(workdir / r["member"] / "metrics.jsonl") for r in rows]
    losses = [[r["train/loss"] for r in h if "train/loss" in r] for h in hist]
    assert losses[3][0] != losses[2][0]  # dpo.seed=7 sees other pairs at step 1


def test_export_writes_commands_and_a_wandb_grid(tmp_path):
    out = sweep.export_sweep(str(ROOT / "configs/label_softness_sweep.py"), tmp_path)
    commands = [line for line in out["commands"].read_text().splitlines() if line.startswith("dpo-jax")]
    assert len(commands) == 9 and all("--config.synthetic.label_noise=" in c for c in commands)
    assert len({c.split("--workdir ")[1].split()[0] for c in commands}) == 9
    assert "wandb" not in out  # 3 noise levels x 3 label treatments is not a full product of the three keys
    grid_out = sweep.export_sweep(str(ROOT / "configs/beta_sweep.py"), tmp_path / "b")
    yaml = grid_out["wandb"].read_text()
    assert "config.dpo.beta:" in yaml and "method: grid" in yaml and '"${args}"' in yaml


def test_vectorized_members_equal_sequential_runs(sequential, tmp_path):
    """K members in one vmapped program give the per-member metrics of K sequential runs."""
    seq_dir, seq, _ = sequential
    base = _base()  # same reference: reuse the sequential sweep's SFT stage and reference cache
    base.sft.dir = str(next((seq_dir / "_shared").iterdir()))
    base.reference.cache_dir = str(seq_dir / "reference_cache")
    vec = sweep.run_sweep(SPEC, tmp_path, base=base, members=MEMBERS, mode="vectorized", devices=jax.devices()[:1])
    for a, b in zip(seq, vec, strict=True):
        assert a["member"] == b["member"]
        for key in ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl_token"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["member"], key)
    for name in (r["member"] for r in seq):
        s_hist, v_hist = read_history(seq_dir / name / "metrics.jsonl"), read_history(tmp_path / name / "metrics.jsonl")
        s_loss = [r["train/loss"] for r in s_hist if "train/loss" in r]
        v_loss = [r["train/loss"] for r in v_hist if "train/loss" in r]
        assert len(v_loss) == len(s_loss) == 4
        np.testing.assert_allclose(v_loss, s_loss, rtol=1e-4, atol=1e-6)
        member = tmp_path / name  # written out as an ordinary run
        assert (member / "hf/model.safetensors").exists() and (member / "plots.png").exists()
        assert sorted(p.name for p in (member / "dpo/checkpoints").iterdir() if p.name.isdigit())[-1] == "8"
        assert list((member / "wandb").glob("offline-run-*"))


def test_vectorized_rejects_members_that_need_separate_programs(tmp_path):
    with pytest.raises(ConfigError, match="sequential"):
        sweep.run_sweep(
            str(ROOT / "configs/label_softness_sweep.py:runlocal"), tmp_path, mode="vectorized", base=tiny_config()
        )

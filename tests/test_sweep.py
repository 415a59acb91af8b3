"""Sweeps: declaration, sequential members sharing one compile, SFT stage and reference cache; export."""

import csv
from pathlib import Path

import jax
import pytest
from test_train import tiny_config

from dpo_jax import sweep, train
from dpo_jax.config import ConfigError

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


def test_sequential_sweep_shares_compile_sft_and_reference_and_resumes(tmp_path, capsys):
    base = tiny_config("optim.steps=6", "eval.every=100")
    spec = str(ROOT / "configs/beta_sweep.py:runlocal")
    before = len(train._STEP_FNS)
    rows = sweep.run_sweep(spec, tmp_path, base=base, devices=jax.devices()[:1])
    assert [r["member"] for r in rows] == ["beta=0.03", "beta=0.3"]
    assert len(train._STEP_FNS) - before <= 2  # one SFT step and one DPO step for both members
    assert len(list((tmp_path / "_shared").iterdir())) == 1 and not (tmp_path / "beta=0.3/sft").exists()
    second = train.load_summary(tmp_path / "beta=0.3")
    assert second["reference/cache_hit"] is True
    assert rows[0]["eval/rewards/margins"] != rows[1]["eval/rewards/margins"]  # beta really differs
    with (tmp_path / "summary.csv").open() as f:
        assert [r["member"] for r in csv.DictReader(f)] == ["beta=0.03", "beta=0.3"]
    assert (tmp_path / "sweep.png").exists()
    capsys.readouterr()
    sweep.run_sweep(spec, tmp_path, base=base, devices=jax.devices()[:1])
    assert capsys.readouterr().out.count("finished, skipped") == 2


def test_export_writes_commands_and_a_wandb_grid(tmp_path):
    out = sweep.export_sweep(str(ROOT / "configs/label_softness_sweep.py"), tmp_path)
    commands = [line for line in out["commands"].read_text().splitlines() if line.startswith("dpo-jax")]
    assert len(commands) == 9 and all("--config.synthetic.label_noise=" in c for c in commands)
    assert len({c.split("--workdir ")[1].split()[0] for c in commands}) == 9
    assert "wandb" not in out  # 3 noise levels x 3 label treatments is not a full product of the three keys
    grid_out = sweep.export_sweep(str(ROOT / "configs/beta_sweep.py"), tmp_path / "b")
    yaml = grid_out["wandb"].read_text()
    assert "config.dpo.beta:" in yaml and "method: grid" in yaml and '"${args}"' in yaml

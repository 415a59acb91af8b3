"""End-to-end runs of the objectives beyond sigmoid DPO (train.train on the built-in task, tiny model): no reference
pass for policy-only losses, KTO from paired and unpaired data, the falling-chosen diagnostic. Apart from
test_train.py so the two pytest workers share the long runs."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import tiny_config

from dpo_jax.data import DataError, synthetic
from dpo_jax.training import evaluate, train
from dpo_jax.training.outputs import read_history

pytestmark = pytest.mark.slow  # end-to-end runs and processes: not in -m quick


def test_policy_only_objectives_run_no_reference_pass_and_kto_trains_on_split_pairs(tmp_path):
    """SimPO reads no reference (no cache entry is written); KTO trains on 2 examples per pair, and at the
    reference (c = 0, z0 = 0) its loss is 1 - s(0) = 1/2 for every example."""
    cache = tmp_path / "cache"
    cfg = tiny_config('dpo.loss_type="simpo"', "dpo.beta=2.0", cache_dir=cache)
    summary = train.train(cfg, tmp_path / "simpo", devices=jax.devices()[:1])
    assert "reference/cache_hit" not in summary and not (cache.exists() and any(cache.iterdir()))
    assert np.isfinite(summary["eval/loss"])
    simpo_first = next(r for r in read_history(tmp_path / "simpo" / "metrics.jsonl") if "eval/loss" in r)

    cfg = tiny_config('dpo.loss_type="kto"', cache_dir=cache)
    summary = train.train(cfg, tmp_path / "kto", devices=jax.devices()[:1])
    assert summary["data/kto_examples"] == f"{cfg.synthetic.n_train} desirable, {cfg.synthetic.n_train} undesirable"
    history = read_history(tmp_path / "kto" / "metrics.jsonl")
    first = next(r for r in history if "eval/loss" in r)
    assert first["eval/loss"] == pytest.approx(0.5, abs=1e-6) and first["eval/kto/kl"] == pytest.approx(0, abs=1e-6)
    # the same SFT reference at step 0: KTO's desirable / undesirable examples are the pairs' chosen / rejected
    for key in ("eval/logps/chosen", "eval/logps/rejected"):
        assert first[key] == pytest.approx(simpo_first[key], rel=1e-5), key
    assert any("train/kto/kl" in r for r in history)


def test_kto_on_unpaired_files_equals_kto_on_the_pairs_they_split_into(tmp_path):
    """TRL's unpaired format (prompt, completion, label) written as the split of the paired files trains exactly
    like KTO on the paired files; unpaired rows with a paired loss are refused."""
    task = synthetic.write_task(tmp_path / "task", synthetic.TaskConfig(n_sft=4, n_train=64, n_eval=16))
    synthetic.build_tokenizer().save(tmp_path / "tok")
    unpaired = {}
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in Path(task[split]).read_text().splitlines()]
        out = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
               for side in ("chosen", "rejected") for r in rows]  # fmt: skip
        unpaired[split] = tmp_path / f"{split}_unpaired.jsonl"
        unpaired[split].write_text("".join(json.dumps(r) + "\n" for r in out))

    def run(name, files, loss="kto"):
        cfg = tiny_config(f'dpo.loss_type="{loss}"', "sft.steps=0", 'task="files"', cache_dir=tmp_path / "cache")
        cfg.data.update(
            train_path=str(files["train"]), eval_path=str(files["eval"]), tokenizer_path=str(tmp_path / "tok")
        )
        train.train(cfg, tmp_path / name, devices=jax.devices()[:1])
        return [r for r in read_history(tmp_path / name / "metrics.jsonl") if "train/loss" in r or "eval/loss" in r]

    paired, split = run("paired", task), run("unpaired", unpaired)
    assert len(paired) == len(split) > 2
    for a, b in zip(paired, split, strict=True):
        for key in ("train/loss", "eval/loss", "train/kto/kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    with pytest.raises(DataError, match="unpaired rows .* dpo.loss_type='kto'"):
        run("refused", unpaired, loss="sigmoid")


def test_falling_chosen_diagnostic_fires_once_on_a_run_that_displaces_the_chosen(tmp_path):
    """Ten times the learning rate: chosen and rejected both fall, the rejected faster: one warning (step named,
    the SFT suggestion), one logged mark, and the run's summary keeps it."""
    cfg = tiny_config("optim.learning_rate=3e-3", cache_dir=tmp_path / "cache")
    summary = train.train(cfg, tmp_path / "run", devices=jax.devices()[:1])
    history = read_history(tmp_path / "run" / "metrics.jsonl")
    marks = [r for r in history if evaluate.FALLING_CHOSEN in r]
    assert len(marks) == 1
    row = next(r for r in history if r["step"] == marks[0]["step"] and "eval/loss" in r)
    assert row["eval/logratio/chosen_per_token"] < 0 < row["eval/rewards/margins"]
    (warning,) = summary["warnings"]
    # one numbering: the warning names the DPO step (as the console and the plots), the row carries it
    assert f"step {int(row['dpo/step'])}:" in warning and evaluate.SFT_HINT in warning
    assert row["dpo/step"] == marks[0]["step"] - cfg.sft.steps

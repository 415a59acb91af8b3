"""Iterative DPO rounds (dpo_jax.research.rounds): pairs are the best and worst samples by the reward, every round is an
ordinary run from the previous round's policy, the kept reference is round 0's, and a round interrupted mid-way
resumes to the same final parameters as an uninterrupted run; config.reward loads module:function and files."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config

from dpo_jax.config import ConfigError
from dpo_jax.data import rewards
from dpo_jax.errors import WorkdirError
from dpo_jax.infra import checkpoint, signals
from dpo_jax.infra.signals import Preempted
from dpo_jax.research import rounds
from dpo_jax.training.outputs import read_history

ROUNDS = ["rounds.num=2", "rounds.samples=4", "rounds.prompts=48", "optim.steps=10", "eval.every=10"]


def positive_fraction(text: str) -> float:
    """The built-in reward by hand: the share of a-h among the letters a-p (0 without letters)."""
    letters = [c for c in text if "a" <= c <= "p"]
    return sum(c <= "h" for c in letters) / len(letters) if letters else 0.0


def test_best_and_worst_by_hand():
    r = np.array([[0.2, 0.9, 0.1, 0.9], [0.5, 0.5, 0.5, 0.5], [0.3, 0.7, 0.0, 1.0], [1.0, 0.0, 0.2, 0.4]])
    eligible = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
    best, worst, ok = rounds.best_and_worst(r, eligible)
    assert best.tolist()[:3] == [1, 0, 1] and worst.tolist()[:3] == [2, 0, 0]  # first of equals; ineligible skipped
    assert ok.tolist() == [True, False, True, False]  # a tie; one eligible sample


def test_round_prompts_cover_the_data_in_slices():
    cfg = tiny_config("rounds.prompts=4")
    slices = [rounds.round_prompts(10, cfg, r) for r in (1, 2, 3)]
    assert sorted(np.concatenate(slices[:2]).tolist()) == sorted(set(np.concatenate(slices[:2]).tolist()))
    assert len(set(slices[2].tolist()) & set(slices[0].tolist())) == 2  # wraps around: 12 of 10
    assert rounds.round_prompts(10, tiny_config("rounds.prompts=0"), 2).tolist() == list(range(10))


def test_reward_names_a_function(tmp_path):
    fn = rewards.load("dpo_jax.data.synthetic:positive_reward")
    for y in ("abip", "zz", "hhhhp", ""):
        assert fn("abc:", y) == positive_fraction(y)
    file = tmp_path / "my_reward.py"
    file.write_text("def length(prompt, completion):\n    return len(completion) - len(prompt)\n\n"
                    "def nan(prompt, completion):\n    return float('nan')\n")  # fmt: skip
    assert rewards.load(f"{file}:length")("ab", "abcde") == 3
    for bad, why in [
        ("no_colon", "no ':function'"),
        ("not_a_module_xyz:f", "cannot import"),
        ("dpo_jax.data.synthetic:missing", "no function missing"),
        (f"{tmp_path}/absent.py:f", "no file"),
    ]:
        with pytest.raises(ConfigError, match=f"config.reward: expected .*{why}"):
            rewards.load(bad)
    with pytest.raises(ConfigError, match="config.reward: expected a finite number"):
        rewards.scorer(f"{file}:nan")(["a"], ["b"])
    cfg = tiny_config("rounds.samples=1")
    with pytest.raises(ConfigError, match="config.rounds.samples: expected an integer >= 2"):
        rounds.run_rounds(cfg, tmp_path / "r")


def test_round_configs_keep_or_refresh_the_reference(tmp_path):
    keep, refresh = tiny_config(*ROUNDS), tiny_config(*ROUNDS, 'rounds.reference="refresh"')
    c1, c2 = rounds.round_config(keep, tmp_path, 1), rounds.round_config(keep, tmp_path, 2)
    assert c2.model.hf_path == str(tmp_path / "round_1" / "hf") and c2.reference.hf_path == str(tmp_path / "round_0/hf")
    assert c1.reference.hf_path == "" and c1.model.hf_path == str(tmp_path / "round_0" / "hf")  # the same model
    assert rounds.round_config(refresh, tmp_path, 2).reference.hf_path == ""  # the previous policy, as initial
    assert c2.task == "files" and c2.sft.steps == 0 and c2.data.train_path == str(tmp_path / "round_2/pairs.jsonl")
    assert c2.reward == "dpo_jax.data.synthetic:positive_reward"


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "hf" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_rounds_end_to_end_and_a_round_resumed_mid_way(tmp_path, monkeypatch):
    cfg = tiny_config(*ROUNDS, cache_dir=tmp_path / "cache")
    a = tmp_path / "a"
    rows = rounds.run_rounds(cfg, a)
    assert [r["round"] for r in rows] == [0, 1, 2] and abs(rows[0]["kl"]) < 1e-5  # pi_0 against itself
    train_prompts = {json.loads(line)["prompt"] for line in (a / "round_0/data/train.jsonl").read_text().splitlines()}
    for r in (1, 2):
        out = a / f"round_{r}"
        record = json.loads((out / "dpo" / "run_config.json").read_text())
        assert record["model.hf_path"] == str(a / f"round_{r - 1}" / "hf")  # trained from the previous policy
        pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
        stats = json.loads((out / "sampling.json").read_text())
        assert stats["prompts"] == 48 and len(pairs) == stats["pairs"] == 48 - stats["skipped_ties"] > 30
        for p in pairs:  # best vs worst by the true reward, computed here by hand
            assert p["prompt"] in train_prompts
            assert p["chosen_reward"] == positive_fraction(p["chosen"]) > positive_fraction(p["rejected"])
            assert p["rejected_reward"] == positive_fraction(p["rejected"])
        assert (out / "summary.json").exists() and (out / "metrics.jsonl").exists()
    s1, s2 = (json.loads((a / f"round_{r}/summary.json").read_text()) for r in (1, 2))
    assert s2["reference/hf_path"] == str(a / "round_0" / "hf")
    # round 2 starts from round 1's policy, not from its reference (round 0's): KL at its step 0 is not zero
    step0 = [next(x for x in read_history(a / f"round_{r}/metrics.jsonl") if "eval/kl_seq_exact" in x) for r in (1, 2)]
    assert abs(step0[0]["eval/kl_seq_exact"]) < 1e-6 and step0[1]["eval/kl_seq_exact"] > 1e-3
    for k in ("reference/reward", "reference/kl_sampled"):  # kept: round 2's reference is round 1's (round 0's)
        assert s1[k] == s2[k]
    assert "| 2 |" in (a / "rounds.md").read_text()

    # samples cut off at max_new_tokens (3 of the task's 6 letters): paired as cut, or dropped
    for mode in ("score", "drop"):
        stats = rounds.make_pairs(tiny_config(*ROUNDS, "rounds.max_new_tokens=3", f'rounds.cut_samples="{mode}"'),
                                  a, 3, a / "round_2" / "hf")  # fmt: skip
        pairs = [json.loads(line) for line in (a / "round_3/pairs.jsonl").read_text().splitlines()]
        flags = [p.get(f"{side}_cut", False) for p in pairs for side in ("chosen", "rejected")]
        # one character a token: a sample that ended (its EOS within the 3 tokens) holds at most 2 letters
        lengths = [len(p[side]) for p in pairs for side in ("chosen", "rejected")]
        assert all(n <= 3 if cut else n <= 2 for cut, n in zip(flags, lengths, strict=True))
        assert (3 in lengths) == (mode == "score")
        assert stats["cut_in_pairs"] == sum(flags) and stats["cut_samples"] > 48
        assert sum(flags) > 0 if mode == "score" else sum(flags) == 0
        shutil.rmtree(a / "round_3")

    # b: a copy of a's rounds 0-1 (a rerun may add rounds: num 1 -> 2), stopped as by SIGTERM right after round
    # 2's checkpoint at step 5, then resumed: round 2 ends with a's final parameters
    b = tmp_path / "b"
    b.mkdir()
    for name in ("round_0", "round_1", "rounds_config.json"):
        (shutil.copytree if (a / name).is_dir() else shutil.copy)(a / name, b / name)
    one = rounds.run_rounds(tiny_config(*ROUNDS, "rounds.num=1", cache_dir=tmp_path / "cache"), b)
    assert [r["round"] for r in one] == [0, 1]
    with pytest.raises(WorkdirError, match="rounds.samples 4 -> 5"):  # how pairs are made may not change
        rounds.run_rounds(tiny_config(*ROUNDS, "rounds.samples=5"), b)
    save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *args, **kw):
        out = save(self, step, *args, **kw)
        if "round_2" in str(self.directory) and step == 5:
            signals._state["flag"] = True
        return out

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Preempted):
        rounds.run_rounds(cfg, b)
    monkeypatch.undo()
    assert checkpoint.latest_step_on_disk(b / "round_2/dpo/checkpoints") == 5
    assert not (b / "round_2" / "summary.json").exists()
    rows_b = rounds.run_rounds(cfg, b)
    assert json.loads((b / "round_2/dpo/run_config.json").read_text())["model.hf_path"] == str(b / "round_1" / "hf")
    assert (b / "round_2/pairs.jsonl").read_text() == (a / "round_2/pairs.jsonl").read_text()
    assert _digest(b / "round_2") == _digest(a / "round_2")  # the same final parameters, bit for bit
    same = lambda rows: [{k: v for k, v in r.items() if k != "policy"} for r in rows]  # noqa: E731
    assert same(rows_b) == same(rows)


def test_the_local_checkpoint_preset_validates_and_the_builtin_task_refuses_paths(tmp_path):
    from helpers import ROOT

    from dpo_jax.config import load_config_file, validate

    smoke = load_config_file(f"{ROOT}/configs/rounds.py:runlocal")
    smoke.model.hf_path = str(tmp_path)  # silently ignored before: a scratch model on the built-in task
    with pytest.raises(ConfigError, match=r"config.task: 'synthetic' .* would ignore model.hf_path: set"):
        validate(smoke, num_devices=1)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "rows.jsonl").write_text("")
    local = load_config_file(f"{ROOT}/configs/rounds.py:hf_cpu")
    local.model.hf_path, local.reward = str(tmp_path), "dpo_jax.data.synthetic:positive_reward"
    local.data.train_path = local.data.eval_path = str(tmp_path / "rows.jsonl")
    validate(local, num_devices=1)
    assert local.task == "files" and local.model.init == "hf" and local.rounds.samples >= 2

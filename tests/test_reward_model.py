"""Reward models (``*ForSequenceClassification`` folders) scored in JAX: equal to transformers' own scores on tiny
random reward models of every dense family, on a batch of mixed lengths, and as ``config.reward``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import COMMON, HF_CASES
from flax import nnx

from dpo_jax.data import rewards, synthetic
from dpo_jax.errors import ModelError
from dpo_jax.infra import hf
from dpo_jax.models import reward

DENSE = ["llama3", "llama_bias_tied", "mistral_window", "qwen2", "qwen3", "gemma3", "olmo2", "phi3"]
CLASSIFIER = {"Gemma3ForCausalLM": "Gemma3TextForSequenceClassification"}


def make_reward_model(name: str, path, seed: int = 0, **overrides):
    """A tiny random transformers reward model of family ``name`` saved in ``path``; returns the torch model."""
    import torch
    import transformers

    config_cls, model_cls, extra = HF_CASES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, "num_labels": 1, **overrides})
    config._attn_implementation = "eager"
    cls = CLASSIFIER.get(model_cls, model_cls.replace("ForCausalLM", "ForSequenceClassification"))
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model


def _batch(vocab=97, seed=0):
    """Right-padded rows of 4 to 13 tokens (pad id 0; real tokens never 0)."""
    rng = np.random.default_rng(seed)
    lengths = [13, 4, 9, 7]
    ids = np.zeros((len(lengths), 13), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, vocab, n)
    return ids, (ids != 0).astype(np.int64)


@pytest.mark.parametrize("name", DENSE)
def test_scores_equal_transformers_on_a_batch_of_mixed_lengths(name, tmp_path):
    import torch

    theirs = make_reward_model(name, tmp_path)
    decoder, score, tok = hf.load_reward_model(tmp_path)
    assert tok is None and score.shape == (1, COMMON["hidden_size"])
    ids, mask = _batch()
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = np.asarray(jax.jit(reward.sequence_scores, static_argnums=3)(decoder, score, ids, 0))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_in_a_run_a_reward_model_takes_the_policys_dtype_and_is_laid_out_over_its_mesh(tmp_path):
    """``reward_model.load(path, dtype, mesh)`` (what a run's eval and online steps score with): over an fsdp=4 x
    tensor=2 mesh of the 8 test devices its weights are split by the policy's rules and its float32 scores are
    transformers'; in bfloat16 its weights are bfloat16 and its scores as near transformers' float32 scores as
    transformers' own bfloat16 model's are (within twice that error)."""
    import torch

    from dpo_jax.data import reward_model
    from dpo_jax.infra import sharding

    theirs = make_reward_model("llama3", tmp_path, hidden_size=64, intermediate_size=96)
    synthetic.build_tokenizer().save(tmp_path)
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    ids, mask = _batch()
    with torch.no_grad():
        want = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()[:, 0]
        theirs_bf16 = theirs.to(torch.bfloat16)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    rounding = np.linalg.norm(theirs_bf16.logits.float().numpy()[:, 0] - want)  # bfloat16's error, by transformers
    assert rounding > 0
    for dtype in ("float32", "bfloat16"):
        rm = reward_model.RewardModel(str(tmp_path), dtype=dtype, mesh=mesh)
        state = nnx.state(rm.decoder)
        leaves = jax.tree.leaves(state)
        assert {str(x.dtype) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == {dtype}
        specs = {str(x.sharding.spec) for x in leaves}
        assert any("fsdp" in spec for spec in specs) and any("tensor" in spec for spec in specs), specs
        got = np.asarray(rm._scores(rm.decoder, rm.score_LxD, ids.astype(np.int32), 0))[:, 0]
        if dtype == "float32":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:  # within twice the error transformers' own bfloat16 model makes (~5% of the scores here)
            assert np.linalg.norm(got - want) <= 2 * rounding, (got, want, rounding)


def test_a_folder_that_is_not_a_reward_model_is_one_clear_error(tmp_path):
    make_reward_model("llama3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelError, match=r"not a reward model we load; expected one of LlamaForSequenceClassification"):
        hf.load_reward_model(tmp_path)


@pytest.mark.parametrize("template", [False, True])
def test_config_reward_naming_a_folder_scores_text_pairs_as_transformers(template, tmp_path):
    """``config.reward`` = a reward model folder: text pairs tokenized as transformers' tokenizer does (with the
    model's chat template when it has one), scored in batches of sorted lengths: transformers' scores, in order."""
    import torch
    import transformers

    theirs = make_reward_model("qwen3", tmp_path)
    tok = synthetic.build_tokenizer()
    if not template:
        tok.chat_template = None
    tok.save(tmp_path)
    rng = np.random.default_rng(3)
    letters = list(synthetic.ALPHABET)
    prompts = ["".join(rng.choice(letters, rng.integers(1, 9))) for _ in range(21)]  # more than one batch of 16
    completions = ["".join(rng.choice(letters, rng.integers(1, 12))) for _ in range(21)]
    prompts[0] = json.dumps([{"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"},
                             {"role": "user", "content": "fg"}])  # fmt: skip  # a conversational prompt's turns
    got = rewards.score_all(str(tmp_path), prompts, completions)

    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    want = []
    for p, y in zip(prompts, completions, strict=True):
        if template:
            turns = json.loads(p) if p.startswith("[") else [{"role": "user", "content": p}]
            ids = their_tok.apply_chat_template([*turns, {"role": "assistant", "content": y}], tokenize=True,
                                                return_dict=False)  # fmt: skip
        else:
            ids = their_tok(p + y)["input_ids"]
        with torch.no_grad():
            want.append(float(theirs(input_ids=torch.tensor([ids])).logits[0, 0]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.std(got) > 0.05  # distinct pairs, distinct scores: the order was kept


@pytest.mark.slow
def test_rounds_pair_samples_by_a_reward_model_and_eval_reports_its_reward(tmp_path, capsys):
    """``dpo-jax rounds`` with ``config.reward`` = a reward model folder: every pair's rewards are the reward model's
    scores of its texts (transformers, through its tokenizer's chat template), best above worst."""
    import torch
    import transformers
    from helpers import tiny_config

    from dpo_jax.research import rounds

    folder = tmp_path / "rm"
    theirs = make_reward_model("llama3", folder)
    synthetic.build_tokenizer().save(folder)
    cfg = tiny_config("rounds.num=1", "rounds.samples=4", "rounds.prompts=16", "optim.steps=4", "eval.every=4",
                      f'reward="{folder}"', cache_dir=tmp_path / "cache")  # fmt: skip
    rows = rounds.run_rounds(cfg, tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1]
    pairs = [json.loads(line) for line in (tmp_path / "run/round_1/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 8
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def score(prompt, completion):
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        ids = tok.apply_chat_template(turns, tokenize=True, return_dict=False)
        with torch.no_grad():
            return float(theirs(input_ids=torch.tensor([ids])).logits[0, 0])

    for p in pairs:
        assert p["chosen_reward"] == pytest.approx(score(p["prompt"], p["chosen"]), rel=1e-4, abs=1e-4)
        assert p["rejected_reward"] == pytest.approx(score(p["prompt"], p["rejected"]), rel=1e-4, abs=1e-4)
        assert p["chosen_reward"] > p["rejected_reward"]
    summary = json.loads((tmp_path / "run/round_1/summary.json").read_text())
    assert np.isfinite(summary["eval/reward"]) and np.isfinite(summary["reference/reward"])
    timing = json.loads((tmp_path / "run/round_1/timing.json").read_text())  # where the round's time went
    assert timing["sample_s"] > 0 and timing["score_s"] > 0 and timing["sampled_tokens"] >= len(pairs)
    assert "[round 1] sampling " in capsys.readouterr().out


@pytest.mark.slow
def test_rounds_on_a_local_checkpoint_with_a_local_reward_model_through_the_command(tmp_path):
    """``dpo-jax rounds --config configs/rounds.py:hf_cpu --config.reward=<reward model folder>`` on a local policy
    checkpoint and local files: the round's pairs carry the reward model's scores (transformers', through its chat
    template), best above worst, and the round trains and evaluates with it."""
    import os

    import torch
    import transformers
    from conftest import xla_env
    from helpers import ROOT, dpo_jax

    task = synthetic.write_task(tmp_path / "task", synthetic.TaskConfig(n_sft=4, n_train=32, n_eval=8))
    tok = synthetic.build_tokenizer()
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "vocab_size": tok.vocab_size})).save_pretrained(
        tmp_path / "policy"
    )
    tok.save(tmp_path / "policy")
    theirs = make_reward_model("qwen2", tmp_path / "rm", vocab_size=tok.vocab_size)
    tok.save(tmp_path / "rm")
    overrides = {
        "model.hf_path": tmp_path / "policy", "reward": tmp_path / "rm", "data.train_path": task["train"],
        "data.eval_path": task["eval"], "data.max_length": 32, "data.max_prompt_length": 16, "data.buckets": "(32,)",
        "rounds.num": 1, "rounds.prompts": 16, "rounds.samples": 4, "rounds.max_new_tokens": 8, "optim.steps": 2,
        "eval.every": 2, "eval.num_prompts": 4, "eval.max_new_tokens": 8, "wandb.enabled": False,
    }  # fmt: skip
    argv = ["rounds", "--config", f"{ROOT}/configs/rounds.py:hf_cpu", "--workdir", str(tmp_path / "run"),
            *(f"--config.{k}={v}" for k, v in overrides.items())]  # fmt: skip
    out = dpo_jax(argv, {**os.environ, "XLA_FLAGS": xla_env(1)}, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    pairs = [json.loads(line) for line in (tmp_path / "run/round_1/pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 8
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    for p in pairs[:4]:
        for side in ("chosen", "rejected"):
            turns = [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p[side]}]
            ids = their_tok.apply_chat_template(turns, tokenize=True, return_dict=False)
            with torch.no_grad():
                want = float(theirs(input_ids=torch.tensor([ids])).logits[0, 0])
            assert p[f"{side}_reward"] == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert p["chosen_reward"] > p["rejected_reward"]
    summary = json.loads((tmp_path / "run/round_1/summary.json").read_text())
    assert np.isfinite(summary["eval/reward"]) and np.isfinite(summary["reference/reward"])

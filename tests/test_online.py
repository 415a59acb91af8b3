"""Online DPO (``rounds.online``, ``dpo_jax.training.online``): each step's pairs are sampled from the policy as it
is at that step, paired best vs worst by the reward, trained in one compiled shape, and a resumed run samples and
trains exactly as one that never stopped; what cannot run online is refused in one line."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import cli, tiny_config

from dpo_jax.config import ConfigError, dpo_seed, validate
from dpo_jax.core import sampling
from dpo_jax.errors import WorkdirError
from dpo_jax.infra.hf import HFTokenizer
from dpo_jax.infra.sharding import take_member
from dpo_jax.infra.signals import Preempted
from dpo_jax.research import rounds
from dpo_jax.training import online
from dpo_jax.training.loop import Hook
from dpo_jax.training.train import train, train_population

ONLINE = ["rounds.online=True", "reference.mode=frozen", "rounds.samples=4", "optim.steps=8", "eval.every=4",
          "checkpoint.every=4", "log_every=2", "optim.batch_size=8", "eval.num_prompts=8"]  # fmt: skip


def positive_fraction(text: str) -> float:
    """The built-in reward by hand: the share of a-h among the letters a-p (0 without letters)."""
    letters = [c for c in text if "a" <= c <= "p"]
    return sum(c <= "h" for c in letters) / len(letters) if letters else 0.0


def pairs_of(batch) -> dict[int, tuple[list[int], list[int], list[int]]]:
    """Pair slot -> (prompt, chosen, rejected) ids, read from the batch's rows by their branch and pair ids (the
    shared-prompt packed layout: prompt tokens branch 0, then the chosen's 1 and the rejected's 2)."""
    tokens, branch, pair = (
        np.asarray(x).reshape(-1) for x in (batch.tokens_GxKxT, batch.branch_GxKxT, batch.pair_GxKxT)
    )
    out = {}
    for p in sorted(set(pair[pair >= 0].tolist())):
        at = pair == p
        out[p] = tuple(tokens[at & (branch == b)].tolist() for b in (0, 1, 2))
    return out


@pytest.mark.slow
def test_each_step_trains_on_best_vs_worst_samples_of_the_current_policy_and_resumes_exactly(tmp_path):
    cfg = tiny_config(*ONLINE)
    tok_dir = tmp_path / "straight" / "data" / "tokenizer"
    checked = []

    def check_next_batch(loop, done):
        """The batch the loop trains next (step ``done``), re-derived here from the policy as it is now."""
        if done >= loop.stage.steps:
            return
        loader = loop.members[0].loader
        batch = loader.batch(done)  # what the loop draws next (the same object: sampled once)
        assert loader.batch(done) is batch
        idx = loader.prompts(done)
        n = len(loader.prompt_ids)
        epoch, k = divmod(done, n // 8)
        order = np.random.default_rng([dpo_seed(cfg), epoch]).permutation(n)
        assert idx.tolist() == order[k * 8 : (k + 1) * 8].tolist()
        # every sample of the step's prompts, from the current policy with the step's keys (sampling.generate itself
        # is checked against transformers in test_sampling)
        tok = HFTokenizer.from_folder(tok_dir)
        model = nnx.merge(loader.graphdef, take_member(loop.state.params, 0, loop.mesh))
        prompts = [loader.prompt_ids[i] for i in idx]
        width = max(len(p) for p in prompts)
        ids, mask = np.full((len(prompts) * 4, width), tok.pad_token_id, np.int32), np.zeros((len(prompts) * 4, width))
        for j, p in enumerate(prompts):
            ids[4 * j : 4 * j + 4, width - len(p) :], mask[4 * j : 4 * j + 4, width - len(p) :] = p, 1
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
            jax.random.fold_in(jax.random.PRNGKey(loader.seed + 3), done), np.arange(len(ids), dtype=np.uint32)
        )
        out = sampling.generate(model, ids, mask.astype(np.int32), key=keys, max_new_tokens=cfg.eval.max_new_tokens,
                                eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)  # fmt: skip
        tokens, valid = np.asarray(out.tokens_BxN), np.asarray(out.mask_BxN).astype(bool)
        samples = [[tokens[4 * j + s][valid[4 * j + s]].tolist() for s in range(4)] for j in range(len(prompts))]
        scores = [[positive_fraction(tok.decode(y)) for y in ys] for ys in samples]
        expected = {}
        for j, (ys, r) in enumerate(zip(samples, scores, strict=True)):
            best, worst = int(np.argmax(r)), int(np.argmin(r))
            if r[best] > r[worst]:
                expected[len(expected)] = (prompts[j].tolist(), ys[best], ys[worst])
        assert pairs_of(batch) == expected
        assert int(np.asarray(batch.valid_GxP).sum()) == len(expected)
        checked.append(done)

    straight = train(cfg, tmp_path / "straight", hooks=[Hook(check_next_batch, every=3)])
    assert checked == [3, 6], checked
    assert straight["dpo/programs"] == 1  # every step in the worst case's shape: one compiled step
    assert straight["online/sampled_steps"] == 8 and straight["online/sample_s_total"] > 0
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    online_rows = [r for r in rows if "online/pairs" in r]
    assert [r["step"] - cfg.sft.steps for r in online_rows] == [2, 4, 6, 8]
    for r in online_rows:
        assert 0 < r["online/pairs"] <= 8 and r["online/pairs"] + r["online/tied_prompts"] == 8
        assert r["online/chosen_reward"] > r["online/rejected_reward"]

    def stop_at_4(loop, done):
        if done == 4:
            loop.stop(done)

    with pytest.raises(Preempted):
        train(cfg, tmp_path / "resumed", hooks=[Hook(stop_at_4)])
    resumed = train(cfg, tmp_path / "resumed")
    weights = lambda d: (tmp_path / d / "hf" / "model.safetensors").read_bytes()  # noqa: E731
    assert weights("resumed") == weights("straight")
    assert resumed["eval/reward"] == straight["eval/reward"]
    after = lambda d: [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                       if "online/pairs" in r and r["step"] > cfg.sft.steps + 4]  # fmt: skip
    # what makes the pairs may not change on a resume (the offline run's rounds.* fields are free)
    for change in ("rounds.samples=3", "rounds.online=False", "rounds.temperature=0.5"):
        with pytest.raises(WorkdirError, match=change.split("=")[0].replace(".", r"\.")):
            train(tiny_config(*ONLINE, change), tmp_path / "straight")
    timing = ("online/sample_s", "online/score_s", "online/sample_tokens_per_s")  # this host's clock
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(after("resumed")) == strip(after("straight"))


def test_what_cannot_run_online_is_refused_in_one_line(tmp_path):
    base = tiny_config(*ONLINE)
    validate(base)
    for name in ("t.jsonl", "e.jsonl"):
        (tmp_path / name).write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    for extra, field in [
        (["reference.mode=cached"], "config.reference.mode"),
        (["dpo.loss_type=kto"], "config.dpo.loss_type"),
        (["task=files", f"data.train_path={tmp_path}/t.jsonl", f"data.eval_path={tmp_path}/e.jsonl",
          f"data.tokenizer_path={tmp_path}"], "config.reward"),
        (["pbt.enabled=True"], "config.pbt.enabled"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate(tiny_config(*ONLINE, *extra))
    with pytest.raises(ConfigError, match=r"config\.rounds\.online: .* not a population"):
        train_population([base, tiny_config(*ONLINE, "dpo.beta=0.2")], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ConfigError, match=r"config\.rounds\.online: online DPO is one run of dpo-jax train"):
        rounds.run_rounds(base, tmp_path / "rounds")
    out = cli(tmp_path / "cli", *ONLINE, "reference.mode=cached")
    assert out.returncode == 2 and out.stdout.count("\n") == 0, out.stdout + out.stderr
    assert "config.reference.mode" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_best_and_worst_pairs_are_sampled_ids_as_they_were_drawn():
    """``sample_ids`` keeps each sample's ids up to and including its EOS, and ``sample_completions`` decodes them."""

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids):
            return " ".join(map(str, ids))

    from dpo_jax.models import ModelConfig, init_decoder

    mc = ModelConfig(vocab_size=11, hidden_size=16, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    model = init_decoder(mc, seed=0)
    prompts = [np.asarray([1, 5, 6], np.int32), np.asarray([1, 7], np.int32)]
    ids, ended = online.sample_ids(model, prompts, n=3, key=jax.random.PRNGKey(4), temperature=1.0,
                                   max_new_tokens=5, budget_mb=1e-3, eos=(2,), pad=0)  # fmt: skip
    assert len(ids) == 2 and all(len(ys) == 3 for ys in ids) and ended.shape == (2, 3)
    for ys, es in zip(ids, ended, strict=True):
        for y, e in zip(ys, es, strict=True):
            assert (2 in y.tolist()) == e and (not e or y[-1] == 2) and len(y) <= 5
            assert 2 not in y[:-1].tolist()  # nothing after the first EOS
    texts, ended2 = rounds.sample_completions(model, Tok(), prompts, n=3, key=jax.random.PRNGKey(4), temperature=1.0,
                                              max_new_tokens=5, budget_mb=1e-3)  # fmt: skip
    assert texts == [[" ".join(map(str, y.tolist())) for y in ys] for ys in ids] and (ended2 == ended).all()


@pytest.mark.slow
def test_a_step_whose_prompts_all_tie_trains_on_nothing(tmp_path):
    """A reward that scores every sample alike leaves no pair: every slot empty, zero loss and gradient, so the
    policy ends exactly where it began (the reference: token KL 0 and margins 0 at the end)."""
    (tmp_path / "flat.py").write_text("def score(prompt, completion):\n    return 1.0\n")
    cfg = tiny_config(*ONLINE, "optim.steps=4", "eval.every=4", f"reward={tmp_path}/flat.py:score")
    summary = train(cfg, tmp_path / "run")
    assert summary["eval/kl_token"] == 0.0 and summary["eval/rewards/margins"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    online_rows = [r for r in rows if "online/pairs" in r]
    assert online_rows and all(r["online/pairs"] == 0 and r["online/tied_prompts"] == 8 for r in online_rows)
    assert all(r["train/loss"] == 0.0 for r in rows if "train/loss" in r)

"""Every loss type against TRL 1.16's own code on the same log-probs (float64; TRL is the oracle).

TRL's DPO loss lives inside ``DPOTrainer._compute_loss``, which reads per-token log-probs from the model's output;
the harness below calls that real method with a trainer namespace and a "model" that returns the given per-token
log-probs (and, for WPO, the given log sum p^2), so every formula that runs is TRL's. CPO/SimPO and ORPO go
through ``CPOTrainer.cpo_loss`` and ``ORPOTrainer.odds_ratio_loss``.
"""

import functools
import importlib
import types
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpo_jax.core import scoring, step
from dpo_jax.core.losses import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCES, preference_loss
from dpo_jax.training import builders


class _Imported:
    """A module imported at its first use: TRL's trainers take ~8 s to import, paid by the worker that runs these
    tests, not by every worker that collects them."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


trl_cpo = _Imported("trl.experimental.cpo.cpo_trainer")
trl_orpo = _Imported("trl.experimental.orpo.orpo_trainer")
trl_dpo = _Imported("trl.trainer.dpo_trainer")
trl_kto = _Imported("trl.trainer.kto_trainer")

B, T = 6, 14  # pairs, token slots per sequence (first slot is the prompt's last token)
DPO_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
# (beta, scale of the log-ratios): moderate margins, small beta, |margins| in the thousands
REGIMES = {"moderate": (0.1, 1.0), "small_beta": (0.005, 1.0), "huge": (0.1, 400.0)}


class _Out:
    def __init__(self, log_probs, log_sum_sq):
        z = torch.zeros_like(log_probs)
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq
        self.entropy, self.mean_logits, self.is_top1 = z, z, torch.zeros_like(log_probs, dtype=torch.bool)


class _Model:
    """Stands in for the network: returns the given per-token log-probs, as TRL's fused LM head would."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # no submodules (accelerate walks them when peft is installed, to test for a PeftModel)

    def __init__(self, log_probs, log_sum_sq=None):
        self.out = _Out(log_probs, torch.zeros_like(log_probs) if log_sum_sq is None else log_sum_sq)

    def __call__(self, **kwargs):
        return self.out


def _accelerator():
    return types.SimpleNamespace(
        device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m
    )


def make_case(regime: str, seed: int = 0):
    """Per-token log-probs [2B, T-1] for chosen then rejected, completion masks, reference log-probs."""
    _, scale = REGIMES[regime]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T, size=2 * B)
    mask = np.zeros((2 * B, T), np.int64)
    for i, n in enumerate(lengths):
        mask[i, T - n :] = 1  # the completion ends the row (left padding is irrelevant: only the mask counts)
    policy = -np.abs(rng.normal(1.5, 1.0, size=(2 * B, T - 1))) * scale / 4
    reference = -np.abs(rng.normal(1.5, 1.0, size=(2 * B, T - 1))) * scale / 4
    policy *= mask[:, 1:]
    reference *= mask[:, 1:]
    log_sum_sq = -np.abs(rng.normal(1.0, 0.3, size=(2 * B, T - 1)))
    return dict(policy=policy, reference=reference, mask=mask, log_sum_sq=log_sum_sq)


def trl_dpo_loss(case, beta, loss_types, weights=None, *, eps=0.0, f="reverse_kl", alpha=0.5, tau=0.05,
                 ld_alpha=None, wpo=False, dtype=torch.float64):  # fmt: skip
    """TRL 1.16's DPO loss on the case's log-probs (the reference model returns the reference log-probs)."""
    t = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    weights = [1.0] * len(loss_types) if weights is None else weights
    policy = _Model(t(case["policy"]), t(case["log_sum_sq"]))
    self = types.SimpleNamespace(
        model=policy, ref_model=_Model(t(case["reference"])), accelerator=_accelerator(), aux_loss_enabled=False,
        ld_alpha=ld_alpha, precompute_ref_logps=False, f_divergence_type=f, f_alpha_divergence_coef=alpha,
        loss_types=list(loss_types), loss_weights=list(weights), beta=beta, label_smoothing=eps,
        use_weighting=wpo, args=types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    ids = torch.zeros(case["mask"].shape, dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor(case["mask"])}
    loss = trl_dpo.DPOTrainer._compute_loss(self, policy, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in self._metrics["train"].items()}


def ours(case, beta, loss_types, weights=None, x64=True, **kw):
    """Our loss on the same numbers: sums and counts per sequence, the mean over pairs."""
    with jax.enable_x64(x64):
        sums = (case["policy"] * case["mask"][:, 1:]).sum(1)
        ref = (case["reference"] * case["mask"][:, 1:]).sum(1)
        counts = case["mask"][:, 1:].sum(1).astype(np.float64)
        losses, metrics = preference_loss(
            sums[:B], sums[B:], ref[:B], ref[B:], loss_type=loss_types, loss_weights=weights, beta=beta,
            chosen_lengths=counts[:B], rejected_lengths=counts[B:], **kw,
        )  # fmt: skip
        assert losses.dtype == (np.float64 if x64 else np.float32)
        return float(np.mean(np.asarray(losses))), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_each_dpo_loss_type_equals_trl(loss_type, regime):
    beta, _ = REGIMES[regime]
    eps = 0.1 if loss_type in ("robust", "exo_pair", "aot", "aot_unpaired") else 0.0
    case = make_case(regime)
    want, trl_metrics = trl_dpo_loss(case, beta, [loss_type], eps=eps)
    got, metrics = ours(case, beta, [loss_type], label_smoothing=eps)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        np.testing.assert_allclose(metrics[key], trl_metrics[key], rtol=1e-6, atol=1e-12, err_msg=key)


def test_a_weighted_mix_equals_trl():
    """TRL's multi-loss: each type on its own inputs (ipo length-averages only its own term)."""
    case = make_case("moderate", seed=3)
    mix, weights = ["sigmoid", "ipo", "sft"], [1.0, 0.3, 0.05]
    want, _ = trl_dpo_loss(case, 0.2, mix, weights)
    got, _ = ours(case, 0.2, mix, weights)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("f", [f for f in F_DIVERGENCES if f != "alpha_divergence"])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences_equal_trl(loss_type, f, regime):
    beta, _ = REGIMES[regime]
    eps = 0.1 if loss_type in ("robust", "exo_pair") else 0.0
    case = make_case(regime, seed=1)
    want, _ = trl_dpo_loss(case, beta, [loss_type], eps=eps, f=f)
    got, _ = ours(case, beta, [loss_type], label_smoothing=eps, f_divergence_type=f)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("alpha", [0.5, 0.9, 1.0, 1.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_alpha_divergence_equals_trl_in_float32(loss_type, alpha, regime):
    """TRL computes the alpha-divergence only in float32 (its clamp table has no float64): 1e-5."""
    beta, _ = REGIMES[regime]
    case = make_case(regime, seed=2)
    want, _ = trl_dpo_loss(case, beta, [loss_type], f="alpha_divergence", alpha=alpha, dtype=torch.float32)
    got, _ = ours(case, beta, [loss_type], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=alpha,
                  x64=False)  # fmt: skip
    # exp((alpha - 1) c) turns float32 rounding of the sums (|c| ~ 1e3 in "huge") into 1e-3 * |alpha - 1| relative
    rtol = 1e-4 if regime == "huge" else 1e-5
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6)


def test_f_divergence_index_is_traced_and_equals_the_name():
    case = make_case("moderate", seed=4)
    for code, name in enumerate(F_DIVERGENCES):
        by_name, _ = ours(case, 0.1, ["sigmoid"], f_divergence_type=name)
        by_code, _ = ours(case, 0.1, ["sigmoid"], f_divergence_type=np.int32(code))
        np.testing.assert_allclose(by_code, by_name, rtol=1e-12)


def test_f_divergence_is_refused_where_trl_refuses_it():
    case = make_case("moderate")
    with pytest.raises(ValueError, match="f_divergence_type"):
        ours(case, 0.1, ["nca_pair"], f_divergence_type="js_divergence")


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_tau_equals_trl(tau):
    case = make_case("moderate", seed=5)
    want, _ = trl_dpo_loss(case, 0.1, ["discopop"], tau=tau)
    got, _ = ours(case, 0.1, ["discopop"], discopop_tau=tau)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bco_pair_running_mean_is_an_option():
    """TRL 1.16: delta = 0; a running mean shifts both rewards by delta (BCO paper)."""
    case = make_case("moderate", seed=6)
    zero, _ = ours(case, 0.1, ["bco_pair"])
    want, _ = trl_dpo_loss(case, 0.1, ["bco_pair"])
    np.testing.assert_allclose(zero, want, rtol=1e-6)
    shifted, _ = ours(case, 0.1, ["bco_pair"], bco_delta=0.7)
    assert abs(shifted - zero) > 1e-3


# --- Reference-free objectives: TRL's CPO trainer (sigmoid, hinge, ipo, simpo) and ORPO --------------------------


def _policy_numbers(case):
    sums = (case["policy"] * case["mask"][:, 1:]).sum(1)
    counts = case["mask"][:, 1:].sum(1).astype(np.float64)
    return sums, counts


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("cpo_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_and_simpo_equal_trl(cpo_type, regime):
    beta, _ = REGIMES[regime]
    case = make_case(regime, seed=7)
    sums, counts = _policy_numbers(case)
    eps, gamma, cpo_alpha = (0.1 if cpo_type in ("sigmoid", "simpo") else 0.0), 0.7, 0.5
    averaged = cpo_type in ("ipo", "simpo")  # TRL's average_log_prob for these
    logps = torch.tensor(sums / counts if averaged else sums)
    self = types.SimpleNamespace(
        alpha=0.0, loss_type=cpo_type, simpo_gamma=gamma, beta=beta, label_smoothing=eps, accelerator=_accelerator()
    )
    trl_losses, _, _ = trl_cpo.CPOTrainer.cpo_loss(self, logps[:B], logps[B:])
    mask = case["mask"][:B, 1:]
    nll = -(case["policy"][:B] * mask).sum() / mask.sum()  # CrossEntropyLoss over the chosen completion tokens
    want = float(trl_losses.mean()) + cpo_alpha * nll
    # Ours: CPO's sigmoid is "cpo"; its hinge / ipo are ours with reference_free; plus "sft" weighted cpo_alpha.
    ours_type = {"sigmoid": "cpo", "simpo": "simpo"}.get(cpo_type, cpo_type)
    extra = {} if ours_type in ("cpo", "simpo") else {"reference_free": True}
    with jax.enable_x64(True):
        losses, _ = preference_loss(
            sums[:B], sums[B:], loss_type=[ours_type, "sft"], loss_weights=[1.0, cpo_alpha], beta=beta,
            label_smoothing=eps, simpo_gamma=gamma, chosen_lengths=counts[:B], rejected_lengths=counts[B:], **extra,
        )  # fmt: skip
    np.testing.assert_allclose(float(np.mean(np.asarray(losses))), want, rtol=1e-6)


@pytest.mark.parametrize("regime", ["moderate", "small_beta"])
def test_orpo_equals_trl(regime):
    """ORPO = NLL - mean(lambda * log s(log odds)) of length-averaged log-probs (TRL ORPOTrainer)."""
    beta, _ = REGIMES[regime]
    case = make_case(regime, seed=8)
    sums, counts = _policy_numbers(case)
    self = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
    avg = torch.tensor(sums / counts)
    ratio_losses, *_ = trl_orpo.ORPOTrainer.odds_ratio_loss(self, avg[:B], avg[B:])
    mask = case["mask"][:B, 1:]
    nll = -(case["policy"][:B] * mask).sum() / mask.sum()
    want = nll - float(ratio_losses.mean())
    with jax.enable_x64(True):
        losses, _ = preference_loss(
            sums[:B], sums[B:], loss_type="orpo+sft", beta=beta, chosen_lengths=counts[:B], rejected_lengths=counts[B:]
        )
    np.testing.assert_allclose(float(np.mean(np.asarray(losses))), want, rtol=1e-6)


def test_policy_only_mixes_need_no_reference():
    case = make_case("moderate")
    sums, counts = _policy_numbers(case)
    losses, metrics = preference_loss(
        sums[:B], sums[B:], loss_type="simpo+sft", chosen_lengths=counts[:B], rejected_lengths=counts[B:]
    )
    assert np.isfinite(np.asarray(losses)).all()
    with pytest.raises(ValueError, match="reference"):
        preference_loss(sums[:B], sums[B:], loss_type="simpo+sigmoid", chosen_lengths=counts[:B],
                        rejected_lengths=counts[B:])  # fmt: skip


def test_aot_ignores_padding_pairs():
    """Padding pairs (mask 0) take no part in the sort: the valid pairs' mean equals TRL on those pairs alone."""
    case = make_case("moderate", seed=9)
    keep = np.array([1, 1, 0, 1, 1, 0], bool)
    sub = {k: (v[np.concatenate([keep, keep])] if k != "log_sum_sq" else v) for k, v in case.items()}
    global B
    full_b, B = B, int(keep.sum())
    try:
        want, _ = trl_dpo_loss(sub, 0.1, ["aot"])
    finally:
        B = full_b
    with jax.enable_x64(True):
        sums = (case["policy"] * case["mask"][:, 1:]).sum(1)
        ref = (case["reference"] * case["mask"][:, 1:]).sum(1)
        losses, _ = preference_loss(sums[:B], sums[B:], ref[:B], ref[B:], loss_type="aot", beta=0.1, mask=keep)
    np.testing.assert_allclose(np.sum(np.asarray(losses)) / keep.sum(), want, rtol=1e-6)
    assert np.all(np.asarray(losses)[~keep] == 0)


# --- Per-token objectives through the scored-token pass: LD-DPO and WPO on a model's own log-probs ---------------


def _tiny_model():
    from dpo_jax.configs.default import get_config
    from flax import nnx

    from dpo_jax.data import synthetic

    cfg = get_config()
    cfg.model.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    return nnx.split(builders.build_model(cfg, synthetic.build_tokenizer()))


def _pairs(vocab, n=6, seed=0):
    from dpo_jax.data import TokenizedPair

    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        return rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).astype(np.int32)

    pairs = [TokenizedPair(ids(1, 6), ids(1, 9), ids(1, 9), 1.0, 1.0) for _ in range(n)]
    pairs[2] = TokenizedPair(pairs[2].prompt, pairs[2].chosen, np.zeros(0, np.int32), 1.0, 1.0)  # empty rejected
    return pairs


def _trl_case(graphdef, params, ref_params, pairs):
    """TRL's inputs: each prompt + completion alone through the model's full logits (NumPy log-softmax); the
    sequences run as one right-padded batch (causal attention: padding after a sequence cannot change it)."""
    from flax import nnx

    n = len(pairs)
    seqs = [np.concatenate([p.prompt, (p.chosen, p.rejected)[side]]) for side in range(2) for p in pairs]
    width = max(len(x) for x in seqs)
    tokens = np.zeros((2 * n, width), np.int32)
    case = {"mask": np.zeros((2 * n, width), np.int64)}
    for row, seq in enumerate(seqs):
        tokens[row, : len(seq)] = seq
        case["mask"][row, len(pairs[row % n].prompt) : len(seq)] = 1
    for key, prm in (("policy", params), ("reference", ref_params)):
        logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(jnp.asarray(tokens)).logits_BxTxV)(prm))
        logp = logits.astype(np.float64)
        logp = logp - np.logaddexp.reduce(logp, axis=-1, keepdims=True)
        case[key] = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0] * case["mask"][:, 1:]
        if key == "policy":
            case["log_sum_sq"] = np.logaddexp.reduce(2 * logp[:, :-1], axis=-1)
    return case


@pytest.fixture(scope="module")
def model_case():
    from dpo_jax.data import Layout, PreferenceLoader

    graphdef, params = _tiny_model()
    ref_params = jax.tree.map(lambda x: x * 1.05, params)
    from dpo_jax.data import synthetic

    pairs = _pairs(synthetic.build_tokenizer().vocab_size)
    loader = PreferenceLoader(pairs, len(pairs), shuffle=False, drop_last=False, layout=Layout(share_prompt=True))
    batch = jax.tree.map(jnp.asarray, loader.batch(0))
    valid = np.asarray(batch.valid_GxP).reshape(-1) > 0
    order = np.asarray(batch.index_GxP).reshape(-1)[valid]
    case = _trl_case(graphdef, params, ref_params, [pairs[i] for i in order])
    return graphdef, params, ref_params, batch, valid, case


@pytest.mark.parametrize("ld_alpha,wpo", [(0.3, False), (0.0, False), (1.0, True), (0.5, True)])
def test_ld_dpo_and_wpo_equal_trl_on_the_model_log_probs(model_case, ld_alpha, wpo):
    """Our packed, shared-prompt batch through the scored-token head (step.pair_losses) vs TRL's _compute_loss
    given each sequence's per-token log-probs (and log sum p^2) from the full logits."""

    graphdef, params, ref_params, batch, valid, case = model_case
    sc = step.StepConfig("dpo", ("sigmoid",), ld=ld_alpha != 1.0, wpo=wpo)
    hp = builders.default_hparams(beta=0.5, ld_alpha=ld_alpha)
    stats = scoring.pair_stats(graphdef, params, batch, tails=sc.ld, wpo=wpo)
    ref = step.reference_logps(graphdef, batch, ref_params, hp, sc, cached=False)
    losses, _ = step.pair_losses(stats, ref, batch, hp, sc)
    got = float(np.asarray(losses)[valid].mean())

    global B
    full_b, B = B, int(valid.sum())
    try:
        want, _ = trl_dpo_loss(case, 0.5, ["sigmoid"], ld_alpha=None if ld_alpha == 1.0 else ld_alpha, wpo=wpo)
    finally:
        B = full_b
    np.testing.assert_allclose(got, want, rtol=2e-5)


# --- KTO: TRL's KTOTrainer._compute_loss on the same log-probs ------------------------------------------------------


class _KTOModel:
    """Returns the example log-probs for the main call and the KL completions' for the KL call."""

    training = True
    is_gradient_checkpointing = False
    _modules: dict = {}  # no submodules (accelerate walks them when peft is installed, to test for a PeftModel)

    def __init__(self, main_ids, main, kl):
        self.main_ids, self.main, self.kl = main_ids, _Out(main, None), _Out(kl, None)

    def __call__(self, **kwargs):
        return self.main if kwargs["input_ids"] is self.main_ids else self.kl


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl(regime, weights):
    beta, scale = REGIMES[regime]
    rng = np.random.default_rng(11)
    n, t = 8, 10
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    policy, kl_policy = (-np.abs(rng.normal(1.5, 1, size=(n, t - 1))) * scale / 4 for _ in range(2))
    ref_sums, ref_kl_sums = rng.normal(-12, 3, size=n) * scale / 4, rng.normal(-12, 3, size=n) * scale / 4
    main_ids, kl_ids = torch.zeros((n, t), dtype=torch.long), torch.zeros((n, t), dtype=torch.long)
    mask = torch.ones((n, t), dtype=torch.long)
    self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), calculate_KL=True,
        precompute_ref_logps=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
        undesirable_weight=weights[1], aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    self._compute_kl_logps = functools.partial(trl_kto.KTOTrainer._compute_kl_logps, self)  # TRL's own method
    inputs = {
        "input_ids": main_ids, "attention_mask": mask, "completion_mask": mask, "KL_input_ids": kl_ids,
        "KL_attention_mask": mask, "KL_completion_mask": mask, "label": torch.tensor(labels),
        "ref_logps": torch.tensor(ref_sums), "ref_KL_logps": torch.tensor(ref_kl_sums),
    }  # fmt: skip
    model = _KTOModel(main_ids, torch.tensor(policy), torch.tensor(kl_policy))
    want = float(trl_kto.KTOTrainer._compute_loss(self, model, inputs, return_outputs=False))
    trl_m = {k: v[-1] for k, v in self._metrics["train"].items()}
    with jax.enable_x64(True):
        losses, m = preference_loss(
            policy.sum(1), kl_policy.sum(1), ref_sums, ref_kl_sums, loss_type="kto", beta=beta,
            target_probs=labels.astype(np.float64), desirable_weight=weights[0], undesirable_weight=weights[1],
        )  # fmt: skip
    np.testing.assert_allclose(float(np.mean(np.asarray(losses))), want, rtol=1e-6)
    same = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    for key, trl_key in (("kto/kl", "kl"), *((k, k) for k in same)):
        np.testing.assert_allclose(float(m[key]), trl_m[trl_key], rtol=1e-6, atol=1e-12, err_msg=key)


def test_kto_examples_from_pairs_use_mismatched_kl_completions():
    from dpo_jax.data import TokenizedPair, kto

    ids = lambda *x: np.asarray(x, np.int32)  # noqa: E731
    pairs = [TokenizedPair(ids(i), ids(10 + i), ids(20 + i), 1.0, 1.0) for i in range(3)]
    ex = kto.from_pairs(pairs)
    assert [int(e.prompt[0]) for e in ex] == [0, 1, 2, 0, 1, 2]
    assert [int(e.chosen[0]) for e in ex] == [10, 11, 12, 20, 21, 22]
    assert [e.prob for e in ex] == [1, 1, 1, 0, 0, 0]
    # the KL completion of example i is example i - 1's completion: never the example's own prompt's pair
    assert [int(e.rejected[0]) for e in ex] == [22, 10, 11, 12, 20, 21]
    for e in ex:
        assert int(e.rejected[0]) % 10 != int(e.prompt[0])

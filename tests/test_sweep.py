"""Sweeps: declaration, sequential members sharing one compile, SFT stage and reference cache; export."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import xla_env
from helpers import TINY, tiny_config

from dpo_jax.config import ConfigError
from dpo_jax.research import sweep
from dpo_jax.training import runs
from dpo_jax.training.loop import StepCache
from dpo_jax.training.outputs import read_history

pytestmark = pytest.mark.slow  # end-to-end runs and processes: not in -m quick

ROOT = Path(__file__).resolve().parents[1]


def test_grid_and_member_names():
    members = sweep.grid({"dpo.beta": [0.1, 0.3], "dpo.label_smoothing": [0.0, 0.2]})
    assert len(members) == 4 and members[1] == {"dpo.beta": 0.1, "dpo.label_smoothing": 0.2}
    assert sweep.member_name(members[1]) == "beta=0.1,label_smoothing=0.2"


def test_unknown_member_key_is_an_error():
    with pytest.raises(ConfigError, match="'dpo.betta'"):
        sweep.apply_overrides(tiny_config(), {"dpo.betta": 0.1})


def test_shipped_sweeps_declare_valid_members():
    for spec in ("configs/beta_sweep.py", "configs/label_softness_sweep.py", "configs/loss_ablation.py"):
        base, members = sweep.load_sweep(str(ROOT / spec))
        assert len(members) >= 4
        for m in members:
            sweep.apply_overrides(base, m)


MEMBERS = [
    {"dpo.beta": 0.03},
    {"dpo.beta": 0.3, "optim.learning_rate": 6e-4},
    # another loss mix (ipo length-averages its own term) in the same program: a traced selection
    {"dpo.label_smoothing": 0.2, "dpo.loss_type": "sigmoid+ipo", "dpo.loss_weights": (1.0, 0.5)},
    {"dpo.soft_target_temperature": 0.3, "dpo.seed": 7},  # its own data order: a [K, B, ...] batch when vectorised
]
BASE = ("optim.steps=8", "eval.every=100", "log_every=2", "wandb.enabled=True", "eval.num_prompts=8",
        "dpo.use_soft_targets=True")  # fmt: skip
SPEC = str(ROOT / "configs/beta_sweep.py:runlocal")


def _base():
    return tiny_config(*BASE)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seq")
    cache = StepCache()
    rows = sweep.run_sweep(SPEC, workdir, base=_base(), members=MEMBERS, devices=jax.devices()[:1], cache=cache)
    return workdir, rows, len(cache.programs)


def test_sequential_sweep_shares_compile_sft_and_reference_and_resumes(sequential, capsys):
    workdir, rows, new_steps = sequential
    assert [r["member"] for r in rows] == [sweep.member_name(m) for m in MEMBERS]
    assert [r["dpo.beta"] for r in rows] == [0.03, 0.3, 0.1, 0.1]  # effective values, base filled in
    # SFT + DPO step, one more DPO step for the member with another learning rate (a static schedule) and one for
    # the member with another loss mix (run alone, its step computes its own types only).
    assert new_steps == 4
    assert len(list((workdir / "_shared").iterdir())) == 1 and not (workdir / rows[1]["member"] / "sft").exists()
    assert all(runs.load_summary(workdir / r["member"])["reference/cache_hit"] for r in rows[1:])
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


def _shared_reference(base, seq_dir):
    """Reuse the sequential sweep's SFT stage and reference cache: the same reference for every comparison."""
    base.sft.dir = str(next((seq_dir / "_shared").iterdir()))
    base.reference.cache_dir = str(seq_dir / "reference_cache")
    return base


def _assert_members_equal(seq_dir, seq, out_dir, out=None, *, eval_keys=("eval/loss", "eval/rewards/margins")):
    """Member by member: train losses (every logged step) and held-out metrics equal the sequential runs."""
    if out is not None:
        assert [r["member"] for r in out] == [r["member"] for r in seq]
    for row in seq:
        name = row["member"]
        got = runs.load_summary(out_dir / name)
        for key in eval_keys:
            assert got[key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), (name, key)
        s_hist, v_hist = read_history(seq_dir / name / "metrics.jsonl"), read_history(out_dir / name / "metrics.jsonl")
        s_loss = [r["train/loss"] for r in s_hist if "train/loss" in r]
        v_loss = [r["train/loss"] for r in v_hist if "train/loss" in r]
        assert len(v_loss) == len(s_loss) == 4
        np.testing.assert_allclose(v_loss, s_loss, rtol=1e-4, atol=1e-6)


def test_vectorized_members_equal_sequential_runs(sequential, tmp_path):
    """K members (beta, lr, label smoothing + loss mix, temperature + data seed) in one vmapped program on one
    device give the per-member results of K sequential runs, and are written out as ordinary runs."""
    seq_dir, seq, _ = sequential
    base, cache = _shared_reference(_base(), seq_dir), StepCache()
    vec = sweep.run_sweep(SPEC, tmp_path, base=base, members=MEMBERS, mode="vectorized", devices=jax.devices()[:1],
                          cache=cache)  # fmt: skip
    _assert_members_equal(seq_dir, seq, tmp_path, vec, eval_keys=("eval/loss", "eval/rewards/accuracies",
                          "eval/rewards/margins", "eval/kl_token"))  # fmt: skip
    for name in (r["member"] for r in seq):
        member = tmp_path / name  # written out as an ordinary run
        assert (member / "hf/model.safetensors").exists() and (member / "plots.png").exists()
        assert sorted(p.name for p in (member / "dpo/checkpoints").iterdir() if p.name.isdigit())[-1] == "8"
        assert list((member / "wandb").glob("offline-run-*"))
        assert runs.load_summary(member)["population/members"] == len(MEMBERS)
    # Resume: lose every member's last checkpoint and summary; the population restarts from step 5 (the members'
    # own checkpoints), redoes steps 6-8 and logs them once, with the same losses.
    before = {n: read_history(tmp_path / n / "metrics.jsonl") for n in (r["member"] for r in seq)}
    for name in before:
        shutil.rmtree(tmp_path / name / "dpo/checkpoints/8")
        (tmp_path / name / "summary.json").unlink()
    sweep.run_sweep(SPEC, tmp_path, base=base, members=MEMBERS, mode="vectorized", devices=jax.devices()[:1],
                    cache=cache)  # fmt: skip
    for name, hist in before.items():
        again = read_history(tmp_path / name / "metrics.jsonl")
        steps = [r["step"] for r in again if "train/loss" in r]
        assert steps == sorted(set(steps))
        np.testing.assert_allclose(
            [r["train/loss"] for r in again if "train/loss" in r], [r["train/loss"] for r in hist if "train/loss" in r],
            rtol=1e-5,
        )  # fmt: skip


def test_members_split_over_eight_devices_and_a_context_axis_equal_sequential_runs(sequential, tmp_path, capsys):
    """4 members over 8 devices: the mesh's member axis holds two members per group of four devices, and inside a
    group data=2 x context=2 (every row's tokens split over two devices, attention by the ring)."""
    seq_dir, seq, _ = sequential
    base = _shared_reference(_base(), seq_dir)
    base.mesh.member, base.mesh.context, base.model.attention_block = 2, 2, 8
    vec = sweep.run_sweep(SPEC, tmp_path, base=base, members=MEMBERS, mode="vectorized", devices=jax.devices()[:8])
    captured = capsys.readouterr()
    assert "(4 members over 2 device groups)" in captured.out + captured.err
    assert "ring over context=2" in captured.out + captured.err
    _assert_members_equal(seq_dir, seq, tmp_path, vec)


def test_members_across_two_processes_equal_sequential_runs(sequential, tmp_path):
    """The same population on 2 processes x 2 devices: members split across the hosts."""
    seq_dir, seq, _ = sequential
    base = _shared_reference(_base(), seq_dir)
    spec = tmp_path / "members.py"
    spec.write_text(
        "from dpo_jax.configs.default import get_config as _default\n\n\n"
        "def get_config(arg=None):\n    return _default()\n\n\n"
        f"def get_sweep(arg=None):\n    return {MEMBERS!r}\n"
    )
    overrides = [*TINY, *BASE, "eval.num_prompts=0", f"sft.dir={base.sft.dir}",
                 f"reference.cache_dir={base.reference.cache_dir}"]  # fmt: skip
    port = 20000 + (os.getpid() + 7) % 20000
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dpo_jax", "sweep", "--config", str(spec), "--workdir", str(tmp_path / "multi"),
             "--mode", "vectorized", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={i}", *(f"--config.{o}" for o in overrides)],
            env={**os.environ, "XLA_FLAGS": xla_env(2)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in (0, 1)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    failed = [o[-3000:] for o, p in zip(outputs, procs, strict=True) if p.returncode]
    assert not failed, failed
    assert "(4 members over 4 device groups)" in outputs[0]
    _assert_members_equal(seq_dir, seq, tmp_path / "multi")


def test_members_are_grouped_by_what_cannot_be_vectorised():
    """The label-softness sweep: noise (data) and use_soft_targets (static) split it; smoothing is traced."""
    _, members = sweep.load_sweep(str(ROOT / "configs/label_softness_sweep.py"))
    groups = sweep.vector_groups(members)
    expected: dict = {}
    for i, m in enumerate(members):
        expected.setdefault((m["synthetic.label_noise"], m["dpo.use_soft_targets"]), []).append(i)
    assert groups == list(expected.values()) and len(groups) == 6
    _, loss_ablation = sweep.load_sweep(str(ROOT / "configs/loss_ablation.py"))
    kto = [i for i, m in enumerate(loss_ablation) if m["dpo.loss_type"] == "kto"]
    assert {m["dpo.loss_type"] for m in loss_ablation} >= {"sigmoid", "ipo", "hinge", "robust", "simpo", "kto"}
    others = [i for i in range(len(loss_ablation)) if i not in kto]
    assert sweep.vector_groups(loss_ablation) == [others, kto]  # one program for the paired objectives


def test_sequential_runs_resume_as_one_population_with_a_loss_mix(sequential, tmp_path, capsys):
    """Runs interrupted alone (each its own loss types) resume together: checkpoints hold no hyper-parameters,
    the population's step computes the union of types, and the members finish as the uninterrupted runs did. The
    members stopped at different steps (as a population killed between two members' saves): they resume from the
    newest step they share."""
    seq_dir, seq, _ = sequential
    picked = [MEMBERS[0], MEMBERS[2]]  # sigmoid alone, and "sigmoid+ipo"
    for k, m in enumerate(picked):
        name = sweep.member_name(m)
        shutil.copytree(seq_dir / name, tmp_path / name, ignore=shutil.ignore_patterns("wandb", "hf"))
        if k == 0:
            shutil.rmtree(tmp_path / name / "dpo/checkpoints/8")  # member 0 at step 5, member 1 at 5 and 8
        (tmp_path / name / "summary.json").unlink()
    base = _shared_reference(_base(), seq_dir)
    capsys.readouterr()
    sweep.run_sweep(SPEC, tmp_path, base=base, members=picked, mode="vectorized", devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "the members' checkpoints are at steps [5, 8]: resuming from step 5, the newest they share" in out
    assert "[dpo] resumed 2 members from step 5" in out and "damaged" not in out
    assert (tmp_path / sweep.member_name(picked[1]) / "dpo/checkpoints/ahead-8").is_dir()
    _assert_members_equal(seq_dir, [r for r in seq if r["member"] in {sweep.member_name(m) for m in picked}], tmp_path)


def _seq_and_vec_equal(base, members, tmp_path):
    """Run ``members`` one by one and as one vectorised population (own reference cache): member by member equal,
    and different from each other. Returns the sequential rows."""
    base.reference.cache_dir = str(tmp_path / "cache")
    seq = sweep.run_sweep(SPEC, tmp_path / "seq", base=base, members=members, devices=jax.devices()[:1])
    vec = sweep.run_sweep(SPEC, tmp_path / "vec", base=base, members=members, mode="vectorized",
                          devices=jax.devices()[:1])  # fmt: skip
    _assert_members_equal(tmp_path / "seq", seq, tmp_path / "vec", vec)
    assert len({r["eval/loss"] for r in seq}) == len(members)
    return seq


def test_new_objectives_in_one_population_equal_their_sequential_runs(sequential, tmp_path):
    """A traced f-divergence with LD-DPO's alpha (reference tails cached), and SimPO's gamma with its NLL term
    (reference-free, beside a member with a reference) in one program give each member's sequential run."""
    seq_dir, _, _ = sequential
    members = [
        {"dpo.f_divergence_type": "js_divergence", "dpo.beta": 0.3, "dpo.ld_alpha": 0.5},
        {"dpo.loss_type": "simpo+sft", "dpo.loss_weights": (1.0, 0.5), "dpo.simpo_gamma": 0.3, "dpo.beta": 1.0},
    ]
    _seq_and_vec_equal(_shared_reference(_base(), seq_dir), members, tmp_path)


def test_lora_members_in_one_population_equal_their_sequential_runs(tmp_path):
    """LoRA members (adapters vmapped, one shared frozen base, adapter dropout) with different beta and learning
    rate."""
    members = [{"dpo.beta": 0.1}, {"dpo.beta": 0.5, "optim.learning_rate": 3e-3}]
    base = tiny_config(*BASE, "sft.steps=4", "lora.rank=4", 'lora.targets="q_proj,v_proj,up_proj"', "lora.dropout=0.1")
    seq = _seq_and_vec_equal(base, members, tmp_path)
    assert all((tmp_path / d / r["member"] / "adapter" / "adapter_model.safetensors").exists()
               for d in ("seq", "vec") for r in seq)  # fmt: skip


def test_a_diverging_member_fails_alone(sequential, tmp_path, capsys):
    """A member at 1e30 x the learning rate becomes NaN/Inf in one step: it is frozen at its last good state and
    marked failed (console, summary, log), and the others' losses and held-out metrics equal their sequential runs."""
    seq_dir, seq, _ = sequential
    base = _shared_reference(_base(), seq_dir)
    members = [MEMBERS[1], {"dpo.beta": 0.1, "optim.learning_rate": 1e30}]
    out = sweep.run_sweep(SPEC, tmp_path, base=base, members=members, mode="vectorized", devices=jax.devices()[:1])
    _assert_members_equal(seq_dir, seq[1:2], tmp_path)
    failed = tmp_path / out[1]["member"]
    summary = runs.load_summary(failed)
    assert summary["population/failed_step"] == 0 and "frozen at its last good state" in " ".join(summary["warnings"])
    assert "member 1: the loss, gradient or parameters became NaN/Inf at step 0" in capsys.readouterr().out
    assert any(r.get("dpo/failed_step") == 0 for r in read_history(failed / "metrics.jsonl"))
    assert "population/failed_step" not in runs.load_summary(tmp_path / out[0]["member"])
    from safetensors.numpy import load_file

    assert all(np.isfinite(v).all() for v in load_file(failed / "hf/model.safetensors").values())  # the last good


@pytest.mark.parametrize("devices", [1, 8])
def test_pbt_replaces_a_failed_member_and_resumes_to_the_same_weights_and_lineage(sequential, tmp_path, devices):
    """PBT over 4 members (one diverging at once), on 1 device and on 8 (a member per pair of devices): at step 4
    the failed member and the worst take the state and perturbed hyper-parameters of members from the top; killed
    after step 2 (its later checkpoints and summaries lost), the rerun redoes the exploit and ends with the same
    weights and the same lineage."""
    from safetensors.numpy import load_file

    seq_dir, _, _ = sequential
    base = _shared_reference(_base(), seq_dir)
    for key, value in (("eval.every", 2), ("eval.num_prompts", 8), ("checkpoint.every", 2), ("checkpoint.keep", 10)):
        base[key.split(".")[0]][key.split(".")[1]] = value
    base.pbt.update(enabled=True, every=4, metric="loss", fraction=0.5, hparams="beta,lr_scale", seed=3)
    members = [{"dpo.beta": 0.03}, {"dpo.beta": 0.3}, {"dpo.beta": 0.1, "optim.learning_rate": 1e30},
               {"dpo.beta": 0.1, "dpo.label_smoothing": 0.2}]  # fmt: skip
    cache = StepCache()  # the rerun's programs are the first run's (a resume is checked, not a recompile)
    run = lambda d: sweep.run_sweep(SPEC, d, base=base.copy_and_resolve_references(), members=members,  # noqa: E731
                                    mode="vectorized", devices=jax.devices()[:devices], cache=cache)  # fmt: skip
    out = run(tmp_path / "a")
    names = [r["member"] for r in out]
    lineage = pbt_rows(tmp_path / "a")
    assert [r["step"] for r in lineage] == [4, 4] and names[2] in [r["member"] for r in lineage]
    child = next(r for r in lineage if r["member"] == names[2])
    assert child["parent"] in names and child["parent"] != names[2] and child["score"] == float("-inf")
    summary = runs.load_summary(tmp_path / "a" / names[2])
    assert summary["pbt/final"]["beta"] != 0.1 and "population/failed_step" not in summary  # replaced, trained on
    weights = {n: load_file(tmp_path / "a" / n / "hf/model.safetensors") for n in names}
    assert all(np.isfinite(v).all() for w in weights.values() for v in w.values())
    # the replaced member's hyper-parameters are its parent's times the logged factors (within the bounds)
    parent_beta = {r["member"]: r["dpo.beta"] for r in out}[child["parent"]]  # a top member: its config's
    assert child["after"]["beta"] / parent_beta in (pytest.approx(0.8), pytest.approx(1.25))

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for n in names:  # killed after step 2: later checkpoints, outputs and summaries never written
        for ckpt in (tmp_path / "b" / n / "dpo/checkpoints").iterdir():
            if ckpt.name.isdigit() and int(ckpt.name) > 2:
                shutil.rmtree(ckpt)
        (tmp_path / "b" / n / "summary.json").unlink()
    run(tmp_path / "b")
    assert pbt_rows(tmp_path / "b") == lineage
    rows = read_history(tmp_path / "b" / names[2] / "metrics.jsonl")  # failed at step 0, before the checkpoint
    assert [r["dpo/failed_step"] for r in rows if "dpo/failed_step" in r] == [0]  # logged once, not again on resume
    for n in names:
        again = load_file(tmp_path / "b" / n / "hf/model.safetensors")
        for key, value in weights[n].items():
            np.testing.assert_array_equal(again[key], value, err_msg=f"{n} {key}")


def pbt_rows(workdir):
    from dpo_jax.research.pbt import Lineage

    return Lineage(workdir / "lineage.jsonl").read()

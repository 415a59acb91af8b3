"""Hub ids resolved in fake (but real-layout) local Hugging Face caches: a model snapshot as huggingface_hub keeps
it, a dataset prepared by ``datasets.load_dataset`` and a dataset repository's parquet shards; nothing downloaded."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_hf_model

from dpo_jax.data.formats import read_rows
from dpo_jax.errors import ConfigError
from dpo_jax.infra import hf, hub

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def snapshot(home, kind, repo, ref="main", commit="0123abcd"):
    folder = home / "hub" / f"{kind}--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def test_a_model_id_resolves_to_its_cached_snapshot_and_loads(home):
    snap = snapshot(home, "models", "acme/tiny-qwen3", ref="v1", commit="feedbeef")
    make_hf_model("qwen3").save_pretrained(snap)
    local = hub.resolve_model("acme/tiny-qwen3@v1", "model.hf_path")
    assert local == str(snap)
    model, _ = hf.load_pretrained(local)
    assert model.config.architecture == "Qwen3ForCausalLM"
    assert hub.resolve_model(str(snap), "model.hf_path") == str(snap)  # a local folder is taken as it is


def test_a_missing_id_is_one_line_naming_the_id_and_the_cache(home):
    with pytest.raises(ConfigError) as e:
        hub.resolve_model("acme/absent", "model.hf_path")
    msg = str(e.value)
    assert "\n" not in msg and "acme/absent" in msg and str(home / "hub") in msg and "model.hf_path" in msg
    snapshot(home, "models", "acme/cached", ref="main", commit="c0ffee")  # cached, but not at the revision asked
    with pytest.raises(ConfigError, match=r"^config\.model\.hf_path: 'acme/cached' is in the hub cache .* but not at "
                                          r"revision 'badrev' \(cached: c0ffee, main\)"):  # fmt: skip
        hub.resolve_model("acme/cached@badrev", "model.hf_path")
    with pytest.raises(ConfigError) as e:
        hub.resolve_dataset("acme/none:train", "data.train_path", ("train",))
    msg = str(e.value)
    assert "\n" not in msg and "data.train_path: 'acme/none:train'" in msg and str(home / "datasets") in msg


def test_a_dataset_prepared_by_load_dataset_resolves_to_its_arrow_file(home, tmp_path):
    datasets = pytest.importorskip("datasets")
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    built = tmp_path / "built"
    datasets.load_dataset("json", data_files={"train": str(src)}, cache_dir=str(built))
    arrow = next(built.rglob("*-train.arrow"))
    # the layout load_dataset gives a hub dataset: <cache>/<owner>___<name>/<config>/<version>/<hash>/
    target = home / "datasets" / "acme___prefs" / "default" / "0.0.0" / "abc123"
    target.mkdir(parents=True)
    os.replace(arrow, target / "prefs-train.arrow")
    local = hub.resolve_dataset("acme/prefs", "data.train_path", ("train",))
    assert local == str(target / "prefs-train.arrow")
    assert [row for _, row in read_rows(local)] == ROWS


def test_a_dataset_repositorys_shards_resolve_per_split(home):
    snap = snapshot(home, "datasets", "acme/prefs2")
    (snap / "data").mkdir()
    for name, rows in (("train-00000-of-00002", ROWS[:2]), ("train-00001-of-00002", ROWS[2:4]),
                       ("test-00000-of-00001", ROWS[4:])):  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows), snap / "data" / f"{name}.parquet")
    train = hub.resolve_dataset("acme/prefs2", "data.train_path", ("train",))
    assert [row for _, row in read_rows(train)] == ROWS[:4]  # both shards, in order
    evals = hub.resolve_dataset("acme/prefs2", "data.eval_path", hub.EVAL_SPLITS)
    assert [row for _, row in read_rows(evals)] == ROWS[4:]
    assert [row for _, row in read_rows(hub.resolve_dataset("acme/prefs2:test", "x", ("train",)))] == ROWS[4:]


def test_validate_resolves_a_configs_hub_ids(home, tmp_path):
    from helpers import tiny_config

    from dpo_jax.config import validate

    snap = snapshot(home, "models", "acme/tiny-llama")
    make_hf_model("llama3").save_pretrained(snap)
    data = snapshot(home, "datasets", "acme/prefs3")
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = tiny_config('task="files"', 'model.init="hf"', 'model.hf_path="acme/tiny-llama"',
                      'data.train_path="acme/prefs3"', 'data.eval_path="acme/prefs3"')  # fmt: skip
    validate(cfg, num_devices=1)
    assert cfg.model.hf_path == str(snap)
    assert (cfg.data.train_path, cfg.data.eval_path) == (str(data / "train.jsonl"), str(data / "test.jsonl"))


def test_a_checkpoints_family_fields_are_not_silently_ignored(home):
    from helpers import tiny_config

    from dpo_jax.config import check_unused_fields

    snap = snapshot(home, "models", "acme/tiny-llama2")
    make_hf_model("llama3").save_pretrained(snap)
    cfg = tiny_config('task="files"', 'model.init="hf"', 'model.hf_path="acme/tiny-llama2"',
                      'model.architecture="Qwen3MoeForCausalLM"')  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"config\.model\.architecture: set .* model\.init='hf' takes the checkpoint's"
    ):
        check_unused_fields(cfg)

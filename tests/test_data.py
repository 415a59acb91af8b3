"""Data layer: every format, every bad-input case, exact masks, resumable order, host shards, synthetic task."""

import codecs
import json
import math

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_jax.data import (
    Columns,
    DataError,
    Layout,
    PreferenceLoader,
    TokenizeConfig,
    load_examples,
    synthetic,
    to_global,
    tokenize_examples,
)
from dpo_jax.data.tokenize import tokenize_example

ROWS = [
    {"prompt": "abc:", "chosen": "abba", "rejected": "mnop", "chosen_prob": 0.8, "weight": 2.0},
    {"prompt": "def:", "chosen": "ddee", "rejected": "ghij"},
    {"prompt": "ghi:", "chosen": "ihg", "rejected": "kkk", "chosen_prob": 0.6},
]


@pytest.fixture(scope="module")
def tok():
    return synthetic.build_tokenizer()


def write(tmp_path, name, rows):
    path = tmp_path / name
    return synthetic.write_rows(rows, path)


def as_tuples(examples):
    return [(e.prompt, e.chosen, e.rejected, e.prob, e.weight) for e in examples]


EXPECTED = [("abc:", "abba", "mnop", 0.8, 2.0), ("def:", "ddee", "ghij", 1.0, 1.0), ("ghi:", "ihg", "kkk", 0.6, 1.0)]

# --- Formats --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet"])
def test_file_formats(tmp_path, suffix):
    examples, report = load_examples(write(tmp_path, f"d.{suffix}", ROWS))
    assert as_tuples(examples) == EXPECTED and report.kept == 3


def test_json_variants(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": ROWS}))
    columns = {k: [r.get(k) for r in ROWS] for k in ("prompt", "chosen", "rejected", "chosen_prob", "weight")}
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    for name in ("wrapped.json", "columns.json"):
        assert as_tuples(load_examples(tmp_path / name)[0]) == EXPECTED


def test_hf_save_to_disk_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert as_tuples(load_examples(tmp_path / "ds")[0]) == EXPECTED
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert as_tuples(load_examples(tmp_path / "dd", split="test")[0]) == EXPECTED[:1]
    with pytest.raises(DataError, match="splits"):
        load_examples(tmp_path / "dd")


def test_custom_column_names(tmp_path):
    rows = [{"q": "abc:", "good": "ab", "bad": "mn", "p": 0.7, "w": 3}]
    cols = Columns(prompt="q", chosen="good", rejected="bad", prob="p", weight="w")
    assert as_tuples(load_examples(write(tmp_path, "c.jsonl", rows), columns=cols)[0]) == [
        ("abc:", "ab", "mn", 0.7, 3.0)
    ]


def test_implicit_prompt_is_the_common_prefix(tmp_path):
    rows = [
        {"chosen": "abc:abba", "rejected": "abc:mnop"},
        {
            "chosen": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "ab"}],
            "rejected": [{"role": "user", "content": "abc"}, {"role": "assistant", "content": "mn"}],
        },
    ]
    ex, _ = load_examples(write(tmp_path, "i.jsonl", rows))
    assert (ex[0].prompt, ex[0].chosen, ex[0].rejected) == ("abc:", "abba", "mnop")
    assert ex[1].prompt == ({"role": "user", "content": "abc"},)
    assert ex[1].chosen == ({"role": "assistant", "content": "ab"},)


# --- Tokenization ---------------------------------------------------------------------------------------------


def test_completion_tokens_are_exactly_the_scored_tokens(tmp_path, tok):
    ex, _ = load_examples(write(tmp_path, "t.jsonl", ROWS))
    pairs, _ = tokenize_examples(ex, tok, TokenizeConfig(max_length=32, max_prompt_length=16))
    padded = Layout("padded", share_prompt=False, buckets=(16,))
    batch = PreferenceLoader(pairs, 3, shuffle=False, layout=padded).batch(0)
    for i, row in enumerate(ROWS):
        for j, key in enumerate(("chosen", "rejected")):
            entries = (batch.score_mask_ZxS[0] == 1) & (batch.score_seq_ZxS[0] == 2 * i + j)  # one block: pair i
            expected = [tok.tokenizer.token_to_id(c) for c in row[key]] + [tok.eos_token_id]
            assert batch.score_target_ZxS[0][entries].tolist() == expected
            # each scored token is predicted by the slot before it, in its own row
            flat = batch.tokens_GxKxT.reshape(-1)
            assert (flat[batch.score_src_ZxS[0][entries] + 1] == batch.score_target_ZxS[0][entries]).all()
            real = batch.tokens_GxKxT[i, j][batch.segment_ids_GxKxT[i, j] > 0]
            prompt = [tok.bos_token_id] + [tok.tokenizer.token_to_id(c) for c in row["prompt"]]
            assert real.tolist() == prompt + expected


def test_conversational_rows_no_double_bos_and_one_eos(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "abc"}],
            "chosen": [{"role": "assistant", "content": "ab"}],
            "rejected": [{"role": "assistant", "content": "mn"}],
        }
    ]
    ex, _ = load_examples(write(tmp_path, "c.jsonl", rows))
    pair = tokenize_example(ex[0], tok, TokenizeConfig(max_length=32, max_prompt_length=16))
    ids = {c: tok.tokenizer.token_to_id(c) for c in "abcmn:"}
    # The template renders "<s>abc:" and "ab</s>": BOS once (from the template), EOS once (from the template).
    assert pair.prompt.tolist() == [tok.bos_token_id, ids["a"], ids["b"], ids["c"], ids[":"]]
    assert pair.chosen.tolist() == [ids["a"], ids["b"], tok.eos_token_id]
    assert pair.rejected.tolist() == [ids["m"], ids["n"], tok.eos_token_id]


def test_a_cut_completion_is_tokenized_without_an_end_of_turn(tmp_path, tok):
    """Rounds mark samples cut off at max_new_tokens (<column>_cut): scored as the policy produced them."""
    rows = [
        {"prompt": "abc", "chosen": "ab", "rejected": "mn", "chosen_cut": True},
        {"prompt": [{"role": "user", "content": "abc"}], "chosen": [{"role": "assistant", "content": "ab"}],
         "rejected": [{"role": "assistant", "content": "mn"}], "rejected_cut": True},
    ]  # fmt: skip
    ex, _ = load_examples(write(tmp_path, "cut.jsonl", rows))
    text, convo = (tokenize_example(e, tok, TokenizeConfig(max_length=32, max_prompt_length=16)) for e in ex)
    ids = {c: tok.tokenizer.token_to_id(c) for c in "abmn"}
    assert text.chosen.tolist() == [ids["a"], ids["b"]]  # cut: no EOS appended
    assert text.rejected.tolist() == [ids["m"], ids["n"], tok.eos_token_id]
    assert convo.chosen.tolist() == [ids["a"], ids["b"], tok.eos_token_id]  # the template ends the turn
    assert convo.rejected.tolist() == [ids["m"], ids["n"]] and not convo.template_mismatch
    bad = {"prompt": "a", "chosen": "b", "rejected": "c", "chosen_cut": "yes"}
    with pytest.raises(DataError, match=r"line 1: field 'chosen_cut': expected true or false, got 'yes'"):
        load_examples(write(tmp_path, "bad_cut.jsonl", [bad]))


def test_no_conversational_template_is_an_error(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "abc"}],
            "chosen": [{"role": "assistant", "content": "ab"}],
            "rejected": [{"role": "assistant", "content": "mn"}],
        }
    ]
    ex, _ = load_examples(write(tmp_path, "c.jsonl", rows))
    bare = synthetic.build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat_template"):
        tokenize_example(ex[0], bare, TokenizeConfig())


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_modes_and_counts(tmp_path, tok, mode):
    rows = [
        {"prompt": "abcdefghij:", "chosen": "abcdefgh", "rejected": "ab"},
        {"prompt": "a:", "chosen": "b", "rejected": "c"},
    ]
    ex, _ = load_examples(write(tmp_path, "t.jsonl", rows))
    cfg = TokenizeConfig(max_length=10, max_prompt_length=5, truncation_mode=mode)
    pairs, stats = tokenize_examples(ex, tok, cfg)
    assert stats == {
        "pairs": 2, "truncated_prompts": 1, "truncated_completions": 1, "unknown_tokens": 0, "template_mismatch": 0
    }  # fmt: skip
    ids = lambda s: [tok.tokenizer.token_to_id(c) for c in s]  # noqa: E731
    if mode == "keep_end":
        assert pairs[0].prompt.tolist() == [tok.bos_token_id, *ids("hij:")]  # BOS kept, start dropped
    else:
        assert pairs[0].prompt.tolist() == [tok.bos_token_id, *ids("abcd")]
    assert pairs[0].chosen.tolist() == ids("abcde")  # 5 + 5 = max_length; EOS cut off with the rest
    assert pairs[0].rejected.tolist() == [*ids("ab"), tok.eos_token_id]
    assert pairs[1].prompt.tolist() == [tok.bos_token_id, *ids("a:")]


# --- Bad input --------------------------------------------------------------------------------------------------

BAD_LINES = [
    ('{"prompt": "a:", "chosen": "b", "rejected": ', "line 2", "malformed JSON"),
    ('{"prompt": "a:", "rejected": "c"}', "line 2", "field 'chosen': missing"),
    ('{"prompt": "a:", "chosen": 5, "rejected": "c"}', "line 2", "field 'chosen': expected a string"),
    ('{"prompt": "a:", "chosen": "b", "rejected": "  "}', "line 2", "field 'rejected': empty completion"),
    ('{"prompt": "a:", "chosen": "b", "rejected": "c", "chosen_prob": 1.5}', "line 2", "field 'chosen_prob': must lie"),
    ('{"prompt": "a:", "chosen": "b", "rejected": "c", "chosen_prob": "high"}', "line 2", "field 'chosen_prob'"),
    (
        '{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
        '"rejected": [{"role": "assistant", "content": "c"}]}',
        "line 2",
        "field 'chosen': conversational completion without an assistant turn",
    ),
    ("[1, 2]", "line 2", "expected an object"),
]


@pytest.mark.parametrize("line,where,message", BAD_LINES)
def test_bad_rows_are_named_or_skipped(tmp_path, line, where, message):
    good = json.dumps({"prompt": "a:", "chosen": "b", "rejected": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(path) in str(err.value) and where in str(err.value) and message in str(err.value)
    examples, report = load_examples(path, on_bad_row="skip")
    assert len(examples) == 2 and report.rows == 3 and sum(report.skipped.values()) == 1
    assert "skipped: 1" in report.summary()


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    rows = [*ROWS, {"prompt": "x:", "chosen": "same", "rejected": "same"}]
    examples, report = load_examples(write(tmp_path, "d.jsonl", rows))
    assert len(examples) == 3 and report.identical_dropped == 1 and "1 dropped" in report.summary()


def test_parquet_bad_row_names_the_row(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([ROWS[1], {"prompt": "a:", "chosen": "b", "rejected": ""}]), tmp_path / "b.parquet"
    )
    with pytest.raises(DataError, match=r"b\.parquet:row 1: field 'rejected': empty completion"):
        load_examples(tmp_path / "b.parquet")


def test_non_utf8_bytes_are_named_with_line_and_offset_or_skipped(tmp_path):
    good = json.dumps({"prompt": "a:", "chosen": "b", "rejected": "c"}).encode() + b"\n"
    bad = b'{"prompt": "a\xff:", "chosen": "b", "rejected": "c"}\n'
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + bad + good)
    with pytest.raises(DataError) as err:
        load_examples(path)
    offset = len(good) + bad.index(b"\xff")  # counted by hand from the bytes written
    assert f"{path}:line 2" in str(err.value) and f"byte offset {offset} (0xff)" in str(err.value)
    examples, report = load_examples(path, on_bad_row="skip")
    assert len(examples) == 2 and sum(report.skipped.values()) == 1


def test_byte_order_marks_and_gzip_files_are_read(tmp_path):
    import gzip

    lines = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    files = {
        "bom.jsonl": codecs.BOM_UTF8 + lines,
        "bom.json": codecs.BOM_UTF8 + json.dumps(ROWS).encode(),
        "rows.jsonl.gz": gzip.compress(lines),
        "rows.json.gz": gzip.compress(json.dumps(ROWS).encode()),
        "plain_name.jsonl": gzip.compress(codecs.BOM_UTF8 + lines),  # gzip content under a plain name
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert as_tuples(load_examples(tmp_path / name)[0]) == EXPECTED, name
    bad = codecs.BOM_UTF8 + b'{"prompt": "\xff"}\n'
    (tmp_path / "bad.jsonl").write_bytes(bad)
    with pytest.raises(DataError, match=r"bad.jsonl:line 1: .*not UTF-8 at byte offset 15 \(0xff\)"):
        load_examples(tmp_path / "bad.jsonl")  # the offset counts the 3-byte mark: 3 + len('{"prompt": "')


def test_duplicate_json_keys_are_counted_with_the_first_place(tmp_path):
    text = (
        '{"prompt": "a:", "chosen": "b", "rejected": "c", "chosen": "d"}\n'
        '{"prompt": "a:", "chosen": "b", "rejected": "c"}\n'
        '{"prompt": [{"role": "user", "content": "a", "content": "x"}], '
        '"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}\n'
    )
    (tmp_path / "dup.jsonl").write_text(text)
    examples, report = load_examples(tmp_path / "dup.jsonl")
    assert examples[0].chosen == "d" and examples[2].prompt[0]["content"] == "x"  # json's rule: the last value
    assert report.duplicate_keys == 2 and report.first_duplicate == f"{tmp_path / 'dup.jsonl'}:line 1 ('chosen')"


def test_a_row_far_past_max_length_is_refused_before_tokenizing(tmp_path):
    good = json.dumps({"prompt": "a:", "chosen": "b", "rejected": "c"})
    huge = json.dumps({"prompt": "a:", "chosen": "b" * 5000, "rejected": "c"})
    convo = json.dumps({"prompt": [{"role": "user", "content": "a" * 3000}, {"role": "user", "content": "a" * 3000}],
                        "chosen": [{"role": "assistant", "content": "b"}],
                        "rejected": [{"role": "assistant", "content": "c"}]})  # fmt: skip
    (tmp_path / "long.jsonl").write_text(f"{good}\n{huge}\n{convo}\n")
    with pytest.raises(DataError, match=r"long.jsonl:line 2: field 'chosen': 5,000 characters, far past .*"
                       r"max_row_chars=4,096"):  # fmt: skip
        load_examples(tmp_path / "long.jsonl", max_chars=4096)
    examples, report = load_examples(tmp_path / "long.jsonl", max_chars=4096, on_bad_row="skip")
    assert len(examples) == 1 and report.skipped == {"row too long": 2}  # 6,000 characters of messages
    assert len(load_examples(tmp_path / "long.jsonl")[0]) == 3  # no bound


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("b.jsonl", b"\n  \n"), ("e.json", b"[]")])
def test_empty_files_are_named(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"no rows in .*{name}"):
        load_examples(tmp_path / name)


def test_malformed_parquet_and_save_to_disk_folders_are_named(tmp_path):
    import datasets

    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=r"unreadable Parquet file .*x\.parquet"):
        load_examples(tmp_path / "x.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=rf"unreadable Arrow file .*{arrow.name}"):
        load_examples(tmp_path / "ds")
    (tmp_path / "ds" / "state.json").write_text('{"_data_files": [')
    with pytest.raises(DataError, match=r"unreadable state\.json in .*ds"):
        load_examples(tmp_path / "ds")


# --- Chat templates: completions are the template's tokens after the prompt's, nothing added ------------------

CHATML = (  # Qwen2-Instruct's template (SmolLM2's is the same ChatML without the default system turn)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # Llama-3-Instruct's template without the date / tool preamble
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHAT_TOKENIZERS = {
    "chatml": (CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|endoftext|>"),
    "llama3": (
        LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>", "<|eot_id|>", None,
    ),
}  # fmt: skip
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "How are you?"}],
        "chosen": [{"role": "assistant", "content": "I am fine, thank you."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say it again\n"},
        ],
        "chosen": [{"role": "assistant", "content": "Hello there!"}],
        "rejected": [{"role": "assistant", "content": "Why?"}],
    },
]


def bpe_chat_tokenizer(path, kind):
    """A byte-level BPE tokenizer folder with the special tokens and chat template of ``kind``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template, specials, bos, eos, pad = CHAT_TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    text = ["How are you? I am fine, thank you. Hello there! Say it again. Why? No. Be brief.", "user assistant system"]
    tok.train_from_iterator(text * 20, trainer)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad}
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return path


@pytest.mark.parametrize("kind", list(CHAT_TOKENIZERS))
def test_chat_completion_ids_equal_the_template_minus_the_prompt(tmp_path, kind):
    import transformers

    from dpo_jax.infra.hf import HFTokenizer

    folder = bpe_chat_tokenizer(tmp_path / kind, kind)
    oracle = transformers.AutoTokenizer.from_pretrained(folder)

    def ids(messages, **kw):
        out = oracle.apply_chat_template(messages, tokenize=True, **kw)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    ours = HFTokenizer.from_folder(folder)
    examples, _ = load_examples(write(tmp_path, "chat.jsonl", CHAT_ROWS))
    eos = oracle.convert_tokens_to_ids(CHAT_TOKENIZERS[kind][3])
    for row, ex in zip(CHAT_ROWS, examples, strict=True):
        pair = tokenize_example(ex, ours, TokenizeConfig(max_length=256, max_prompt_length=128))
        prompt = ids(row["prompt"], add_generation_prompt=True)
        assert pair.prompt.tolist() == prompt
        for key in ("chosen", "rejected"):
            full = ids(row["prompt"] + row[key])
            assert full[: len(prompt)] == prompt
            assert getattr(pair, key).tolist() == full[len(prompt) :]
            assert getattr(pair, key).tolist().count(eos) == 1  # the turn's own end, no second EOS


# --- Batching ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_pairs(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    paths = synthetic.write_task(d, synthetic.TaskConfig(n_sft=8, n_train=203, n_eval=8, seed=1))
    ex, _ = load_examples(paths["train"])
    return tokenize_examples(ex, tok, TokenizeConfig(max_length=32, max_prompt_length=16))[0]


def test_fixed_shapes_from_buckets(task_pairs):
    loader = PreferenceLoader(task_pairs, 16, layout=Layout("padded", share_prompt=False, buckets=(8, 16, 64)))
    shapes = {loader.batch(s).tokens_GxKxT.shape for s in range(30)}
    assert shapes == {(16, 2, 16)}  # every sequence is 7 + 7 tokens: the 16 bucket


def test_resume_at_any_step_equals_uninterrupted(task_pairs):
    loader = PreferenceLoader(task_pairs, 16, seed=3)
    uninterrupted = [b for _, b in loader.iterate(0, 30)]
    resumed = [b for _, b in PreferenceLoader(task_pairs, 16, seed=3).iterate(17, 13)]
    for a, b in zip(uninterrupted[17:], resumed, strict=True):
        for k, x in a.arrays().items():
            np.testing.assert_array_equal(x, getattr(b, k))


def test_epochs_cover_rows_once_and_reshuffle(task_pairs):
    loader = PreferenceLoader(task_pairs, 16, seed=0)
    spe = loader.steps_per_epoch
    assert spe == 203 // 16
    epoch0 = np.concatenate([loader.global_indices(s) for s in range(spe)])
    epoch1 = np.concatenate([loader.global_indices(s) for s in range(spe, 2 * spe)])
    assert len(set(epoch0)) == len(epoch0) == spe * 16
    assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize(
    "layout", [Layout(), Layout(share_prompt=False), Layout("padded", share_prompt=False, buckets=(16, 64))]
)
def test_two_hosts_see_every_row_once_per_epoch(task_pairs, layout):
    hosts = [
        PreferenceLoader(task_pairs, 16, seed=5, drop_last=False, layout=layout, process_index=i, process_count=2)
        for i in (0, 1)
    ]
    seen = []
    for step in range(hosts[0].steps_per_epoch):
        batches = [h.batch(step) for h in hosts]
        for k, x in batches[0].arrays().items():
            assert x.shape == getattr(batches[1], k).shape
        for b in batches:
            seen.extend(b.index_GxP[b.valid_GxP == 1].tolist())
    assert sorted(seen) == list(range(len(task_pairs)))


def test_last_batch_padding_is_marked_invalid(task_pairs):
    padded = Layout("padded", share_prompt=False)
    loader = PreferenceLoader(task_pairs, 16, shuffle=False, drop_last=False, layout=padded)
    last = loader.batch(loader.steps_per_epoch - 1)
    assert last.valid_GxP.sum() == 203 % 16 and (last.index_GxP[last.valid_GxP == 0] == -1).all()
    empty = last.valid_GxP[:, 0] == 0
    assert (last.segment_ids_GxKxT[empty] == 0).all()
    assert last.score_mask_ZxS.sum() == sum(len(task_pairs[i].chosen) + len(task_pairs[i].rejected)
                                           for i in last.index_GxP[~empty, 0])  # fmt: skip


def test_global_arrays_on_8_devices(task_pairs):
    from dpo_jax.infra.sharding import make_mesh

    mesh = make_mesh(data=4, fsdp=2)
    batch = PreferenceLoader(
        task_pairs, 16, layout=Layout("padded", share_prompt=False, buckets=(16,), row_multiple=8)
    ).batch(0)
    arrays = to_global(batch, mesh)
    assert arrays.tokens_GxKxT.shape == (16, 2, 16) and len(arrays.tokens_GxKxT.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(arrays.tokens_GxKxT), batch.tokens_GxKxT)
    flat = np.asarray(jax.jit(lambda t: t.reshape(32, 16))(arrays.tokens_GxKxT))
    np.testing.assert_array_equal(flat[0::2], batch.tokens_GxKxT[:, 0])  # pair-major: chosen rows are even


# --- Synthetic task ---------------------------------------------------------------------------------------------


def test_reward_by_hand():
    assert synthetic.reward("abc:", "aabm", "copy_prompt") == 0.75
    assert synthetic.reward("abc:", "mnop", "copy_prompt") == 0.0
    assert synthetic.reward("mno:", "ahim") == 0.5  # positive letters: a-h
    assert synthetic.reward("abc:", "") == 0.0


def test_bradley_terry_labels_and_soft_probabilities():
    cfg = synthetic.TaskConfig(tau=0.25)
    rng = np.random.default_rng(0)
    rows = [synthetic.label_pair("xyz:", "aaaaaa", "aaammm", cfg, rng) for _ in range(4000)]
    p_first = 1 / (1 + math.exp(-(1.0 - 0.5) / 0.25))
    freq = np.mean([r["chosen"] == "aaaaaa" for r in rows])
    assert abs(freq - p_first) < 0.02
    for r in rows[:20]:
        assert r["chosen_prob"] == pytest.approx(
            1 / (1 + math.exp(-(r["chosen_reward"] - r["rejected_reward"]) / 0.25))
        )
    noisy = synthetic.TaskConfig(tau=0.25, label_noise=0.3)
    rows = [synthetic.label_pair("xyz:", "aaaaaa", "aaammm", noisy, rng) for _ in range(4000)]
    freq = np.mean([r["chosen"] == "aaaaaa" for r in rows])
    assert abs(freq - (0.7 * p_first + 0.3 * (1 - p_first))) < 0.02
    for r in rows[:20]:  # the noisy process's own probability that "chosen" is labelled the winner
        p = p_first if r["chosen"] == "aaaaaa" else 1 - p_first
        assert r["chosen_prob"] == pytest.approx(0.7 * p + 0.3 * (1 - p))


def test_synthetic_eval_labels_are_clean(tmp_path):
    """With label noise the train labels are flipped, the held-out ones are not (same pairs otherwise)."""
    import json

    noisy = synthetic.write_task(
        tmp_path / "n", synthetic.TaskConfig(n_sft=4, n_train=400, n_eval=400, label_noise=0.4)
    )
    clean = synthetic.write_task(tmp_path / "c", synthetic.TaskConfig(n_sft=4, n_train=400, n_eval=400))
    load = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    assert load(noisy["eval"]) == load(clean["eval"])
    flipped = [a["chosen"] != b["chosen"] for a, b in zip(load(noisy["train"]), load(clean["train"]), strict=True)]
    assert 0.3 < np.mean(flipped) < 0.5


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "hf_disk"])
def test_synthetic_task_round_trips_through_user_formats(tmp_path, fmt, tok):
    cfg = synthetic.TaskConfig(n_sft=4, n_train=50, n_eval=4, seed=2)
    rows = synthetic.preference_rows(cfg, cfg.n_train, np.random.default_rng(0))
    if fmt == "hf_disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        path = tmp_path / "ds"
    else:
        path = synthetic.write_rows(rows, tmp_path / f"train.{fmt}")
    examples, report = load_examples(path)
    assert report.kept == 50
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in rows
    ]
    assert [e.prob for e in examples] == pytest.approx([r["chosen_prob"] for r in rows])
    for e in examples:
        assert synthetic.reward(e.prompt, e.chosen) == next(
            r["chosen_reward"] for r in rows if r["chosen"] == e.chosen and r["prompt"] == e.prompt
        )


def test_tokenizer_folder_loads_through_the_hf_path(tmp_path):
    from dpo_jax.infra.hf import HFTokenizer

    paths = synthetic.write_task(tmp_path, synthetic.TaskConfig(n_sft=2, n_train=2, n_eval=2))
    loaded = HFTokenizer.from_folder(paths["tokenizer"])
    assert loaded.encode("abc:") == [3, 4, 5, 19] and loaded.decode([1, 3, 4, 2]) == "ab"
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)


@pytest.mark.slow
def test_onpolicy_pairs_from_a_model(tok):
    from dpo_jax.models import ModelConfig, init_decoder

    model = init_decoder(
        ModelConfig(
            vocab_size=tok.vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            initializer_range=0.5,
        )
    )
    cfg = synthetic.TaskConfig()
    rows = synthetic.onpolicy_rows(model, tok, ["abcde:", "fghij:", "klmno:"], cfg, key=1)
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    for r in rows:
        assert r["chosen_reward"] == synthetic.reward(r["prompt"], r["chosen"], cfg.reward)


def test_unpaired_rows_are_trl_kto_format_and_bad_labels_name_the_line():
    from dpo_jax.data import parse_row

    ex = parse_row({"prompt": "Q", "completion": " A", "label": False}, "f.jsonl:line 3")
    assert ex.unpaired and ex.chosen == " A" and ex.prob == 0.0
    assert parse_row({"prompt": "Q", "completion": " A", "label": True}, "x").prob == 1.0
    with pytest.raises(DataError, match=r"f.jsonl:line 3: field 'label': expected true or false, got 'yes'"):
        parse_row({"prompt": "Q", "completion": " A", "label": "yes"}, "f.jsonl:line 3")

"""The built-in preference task: a verifiable scalar reward a tiny model learns on one CPU in minutes.

In the spirit of the DPO paper's IMDb sentiment experiment (a known reward, so DPO can be *measured*): a
prompt is a short string of letters, a completion is another string, and the reward is computed exactly:

  ``positive`` (default)  the fraction of completion letters from the "positive" half a-h of the alphabet,
                          whatever the prompt (like sentiment, a property of the completion); a uniform
                          completion scores 0.5 on average, the best one 1.
  ``copy_prompt``         the fraction of completion letters that occur in the prompt; a prompt-conditional
                          rule, harder for a tiny model (a uniform completion scores ~0.28).

The task provides a character tokenizer saved in the Hugging Face format (so the ordinary loading code reads
it), SFT demonstrations (uniform-random completions: the reference policy), the reward, and preference pairs
of reference-like completions labelled by the Bradley-Terry model of the reward: the probability that y1
beats y2 is sigmoid((r1 - r2) / tau). Each pair carries a hard sampled label, flipped with probability
``label_noise`` = eps, and the soft probability that this noisy labelling process prefers the chosen one,
``chosen_prob`` = (1 - eps) sigmoid(d / tau) + eps sigmoid(-d / tau) with d = r_chosen - r_rejected: what many
independent noisy annotators' vote share converges to (at eps = 0, the Bradley-Terry probability). The eval set
is labelled without noise (clean held-out labels), so held-out accuracy measures the true preference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from dpo_jax.core import sampling
from dpo_jax.infra.hf import HFTokenizer

ALPHABET = "abcdefghijklmnop"
POSITIVE = frozenset("abcdefgh")
REWARDS = ("positive", "copy_prompt")
SEPARATOR = ":"
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}:"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    prompt_length: int = 5
    completion_length: int = 6
    n_sft: int = 2048
    n_train: int = 2048
    n_eval: int = 256
    tau: float = 0.1  # Bradley-Terry temperature of the reward: P(y1 > y2) = sigmoid((r1 - r2) / tau)
    label_noise: float = 0.0  # probability that a hard label is flipped
    reward: str = "positive"  # positive | copy_prompt
    seed: int = 0

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"synthetic.reward must be one of {REWARDS}, got {self.reward!r}")


def build_tokenizer() -> HFTokenizer:
    """A character-level tokenizer: <pad>=0, <s>=1, </s>=2, then the letters and the separator."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *ALPHABET, SEPARATOR])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS])
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": PAD}
    return HFTokenizer(tok, special, CHAT_TEMPLATE, {"tokenizer_class": "PreTrainedTokenizerFast"})


def reward(prompt: str, completion: str, kind: str = "positive") -> float:
    """The task's reward of a completion (0 for one without letters); ``kind`` as in the module docstring."""
    letters = [c for c in completion if c in ALPHABET]
    if not letters:
        return 0.0
    good = POSITIVE if kind == "positive" else set(prompt)
    return sum(c in good for c in letters) / len(letters)


def positive_reward(prompt: str, completion: str) -> float:
    """``reward(..., "positive")``: the built-in task's default reward as a ``config.reward`` function."""
    return reward(prompt, completion, "positive")


def copy_prompt_reward(prompt: str, completion: str) -> float:
    """``reward(..., "copy_prompt")`` as a ``config.reward`` function."""
    return reward(prompt, completion, "copy_prompt")


def _letters(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list(ALPHABET), size=n))


def sft_rows(cfg: TaskConfig, rng: np.random.Generator) -> list[dict]:
    """Demonstrations of the reference policy: uniform-random completions of the task's length."""
    return [
        {"prompt": _letters(rng, cfg.prompt_length) + SEPARATOR, "completion": _letters(rng, cfg.completion_length)}
        for _ in range(cfg.n_sft)
    ]


def label_pair(prompt: str, y1: str, y2: str, cfg: TaskConfig, rng: np.random.Generator) -> dict:
    """A preference row for two completions: hard Bradley-Terry label (with noise) and soft probability."""
    r1, r2 = reward(prompt, y1, cfg.reward), reward(prompt, y2, cfg.reward)
    p1 = 1.0 / (1.0 + math.exp(-(r1 - r2) / cfg.tau))
    first_wins = rng.random() < p1
    if rng.random() < cfg.label_noise:
        first_wins = not first_wins
    (chosen, rc), (rejected, rr) = ((y1, r1), (y2, r2)) if first_wins else ((y2, r2), (y1, r1))
    p = 1.0 / (1.0 + math.exp(-(rc - rr) / cfg.tau))
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chosen_prob": (1 - cfg.label_noise) * p + cfg.label_noise * (1 - p),
        "chosen_reward": rc,
        "rejected_reward": rr,
    }


def preference_rows(cfg: TaskConfig, n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    while len(rows) < n:
        prompt = _letters(rng, cfg.prompt_length) + SEPARATOR
        y1, y2 = _letters(rng, cfg.completion_length), _letters(rng, cfg.completion_length)
        if y1 != y2:
            rows.append(label_pair(prompt, y1, y2, cfg, rng))
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    """Write rows as .jsonl, .json or .parquet (by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"{path}: write .jsonl, .json or .parquet")
    return path


def write_task(out_dir: str | Path, cfg: TaskConfig = TaskConfig(), fmt: str = "jsonl") -> dict[str, Path]:
    """Tokenizer folder plus sft / train / eval files in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    rng = np.random.default_rng(cfg.seed)
    tokenizer_dir = out / "tokenizer"
    build_tokenizer().save(tokenizer_dir)
    paths = {"tokenizer": tokenizer_dir}
    paths["sft"] = write_rows(sft_rows(cfg, rng), out / f"sft.{fmt}")
    paths["train"] = write_rows(preference_rows(cfg, cfg.n_train, rng), out / f"train.{fmt}")
    clean = dataclasses.replace(cfg, label_noise=0.0)  # held-out labels without annotator noise
    paths["eval"] = write_rows(preference_rows(clean, cfg.n_eval, rng), out / f"eval.{fmt}")
    return paths


def onpolicy_rows(
    model, tokenizer: HFTokenizer, prompts: list[str], cfg: TaskConfig, *, key=0, temperature: float = 1.0
) -> list[dict]:
    """Preference rows from two samples of ``model`` per prompt (e.g. the SFT reference), labelled as above."""
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(p)] for p in prompts]
    width = max(map(len, ids))
    prompt_BxP = np.array([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids] * 2, np.int32)
    mask_BxP = (np.arange(width)[None, :] >= width - np.array([len(x) for x in ids] * 2)[:, None]).astype(np.int32)
    out = sampling.generate(
        model,
        prompt_BxP,
        mask_BxP,
        key=key,
        max_new_tokens=cfg.completion_length + 1,
        temperature=temperature,
        eos_ids=(tokenizer.eos_token_id,),
        pad_id=tokenizer.pad_token_id,
    )
    texts = [tokenizer.decode(np.asarray(t)[np.asarray(m)]) for t, m in zip(out.tokens_BxN, out.mask_BxN, strict=True)]
    rng = np.random.default_rng(int(np.asarray(key).sum()) if not isinstance(key, int) else key)
    n = len(prompts)
    return [label_pair(prompts[i], texts[i], texts[n + i], cfg, rng) for i in range(n) if texts[i] != texts[n + i]]

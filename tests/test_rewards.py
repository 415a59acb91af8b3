"""The reward a config names: its errors are one line naming it and the row, it never hangs a run, and a stop
signal is honoured while it runs."""

import os
import signal
import threading
import time

import numpy as np
import pytest

from dpo_jax.data import rewards
from dpo_jax.infra import signals
from dpo_jax.infra.signals import Preempted

REWARDS = """
import time

def length(prompt, completion):
    return len(completion)

def raises(prompt, completion):
    if completion == "bad":
        raise ValueError("cannot score this")
    return 1.0

def text(prompt, completion):
    return "0.5"

def flag(prompt, completion):
    return True

def numpy_value(prompt, completion):
    import numpy as np
    return np.float32(0.25)

def hangs(prompt, completion):
    if completion == "slow":
        time.sleep(60)
    return 0.0
"""


@pytest.fixture()
def module(tmp_path):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return tmp_path / "my_rewards.py"


def test_values_are_the_functions_numbers(module):
    assert rewards.score_all(f"{module}:length", ["p"] * 3, ["a", "bb", ""]).tolist() == [1.0, 2.0, 0.0]
    assert rewards.score_all(f"{module}:numpy_value", ["p"], ["a"]).tolist() == [0.25]


@pytest.mark.parametrize(
    "name,message",
    [("raises", r"raised ValueError: cannot score this on prompt 'p', completion 'bad'"),
     ("text", r"expected a finite number \(int or float\) from .*:text for prompt 'p', completion 'ok'; got '0.5'"),
     ("flag", r"expected a finite number .* got True")],
)  # fmt: skip
def test_a_bad_reward_is_one_line_naming_it_and_the_row(module, name, message):
    with pytest.raises(rewards.RewardError, match=rf"^config.reward: .*{message}") as err:
        rewards.score_all(f"{module}:{name}", ["p", "p"], ["ok", "bad"])
    assert "\n" not in str(err.value) and f"{module}:{name}" in str(err.value)


def test_a_reward_that_hangs_times_out(module):
    t0 = time.monotonic()
    with pytest.raises(rewards.RewardError, match=r"took longer than reward_timeout_s=0.3 s on prompt 'p', "
                       r"completion 'slow'"):  # fmt: skip
        rewards.score_all(f"{module}:hangs", ["p"] * 3, ["a", "slow", "b"], timeout_s=0.3)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_honoured_while_the_reward_hangs(module, signum):
    threading.Timer(0.3, os.kill, (os.getpid(), signum)).start()
    t0 = time.monotonic()
    with signals.stop_signals(), pytest.raises(Preempted, match=r"while .*:hangs scored samples") as err:
        rewards.score_all(f"{module}:hangs", ["p"] * 2, ["a", "slow"], timeout_s=600)
    assert time.monotonic() - t0 < 5 and err.value.exit_code == 128 + signum
    signals._state["flag"] = False  # as a new run starts
    assert np.isfinite(rewards.score_all(f"{module}:length", ["p"], ["a"])).all()  # a later call works

"""The ``dpo-jax`` command's processes, started without paying its imports each time.

A test that runs ``python -m dpo_jax ...`` spends ~3 s of CPU importing JAX, Flax, Orbax and the package before the
command does anything; the suite starts dozens. This module, run as a script, imports ``dpo_jax.main`` once (no
thread started, no JAX backend) and then, per request read from its stdin, forks a child that *is* the command's
process from there on: its own pid, environment, working directory, stdin from /dev/null, stdout and stderr to
files, ``console_main()`` run to the interpreter's normal exit (exit status, ``atexit``). The parent (``run``) gets
what ``subprocess.run`` gives. Tests that signal or kill a run, or start several processes of one job, start real
``subprocess`` processes instead.
"""

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path


def _child(request: dict) -> None:
    """In the forked child: become the command's process, then run it (never returns: SystemExit unwinds)."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.path[0] = request["cwd"]  # as ``python -m`` puts its working directory first
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):  # fmt: skip
        os.dup2(os.open(path, flags), fd)
    sys.argv = ["dpo-jax", *request["argv"]]
    from dpo_jax.main import console_main

    console_main()


def serve() -> None:
    """One JSON request a line: fork its children, wait for them all, answer with their exit statuses."""
    import dpo_jax.main  # noqa: F401  (what every child shares)

    requests = os.fdopen(0, "rb", buffering=0)
    while line := _readline(requests):
        pids = []
        for request in json.loads(line):
            pid = os.fork()
            if pid == 0:
                _child(request)  # raises SystemExit out of serve(): the child ends as its own process
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        os.write(1, (json.dumps(codes) + "\n").encode())


def _readline(stream) -> bytes:
    """A line, byte by byte (nothing read ahead: a forked child holds no buffered requests)."""
    out = b""
    while (byte := stream.read(1)) not in (b"", b"\n"):
        out += byte
    return out


# Read when Python or JAX starts (the server's, before any fork): a command with other values runs as a process.
AT_START = ("PYTHON", "JAX_")


class Zygote:
    """The server process, started on first use; one request at a time (a lock), each a batch run together."""

    def __init__(self):
        self._proc = None
        self._lock = threading.Lock()
        self._env = None

    def serves(self, env: dict) -> bool:
        """Whether a command with ``env`` can be forked: what Python and JAX read at start-up is the server's."""
        start = self._env if self._env is not None else os.environ
        return all(env.get(k) == start.get(k) for k in {*env, *start} if k.startswith(AT_START))

    def _start(self):
        self._env = dict(os.environ)
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      cwd=Path(__file__).parent, start_new_session=True)  # fmt: skip

    def run_many(self, commands: list[tuple[list[str], dict]], timeout: float = 600) -> list:
        """``[(argv after "dpo-jax", environment)]`` run together; ``subprocess.CompletedProcess`` each."""
        with self._lock, tempfile.TemporaryDirectory(prefix="dpo_jax_cmd_") as tmp:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert all(self.serves(env) for _, env in commands), "run these as processes (subprocess)"
            requests = []
            for i, (argv, env) in enumerate(commands):
                out, err = Path(tmp, f"{i}.out"), Path(tmp, f"{i}.err")
                out.touch(), err.touch()
                requests.append(dict(argv=argv, env=env, cwd=os.getcwd(), stdout=str(out), stderr=str(err)))
            self._proc.stdin.write((json.dumps(requests) + "\n").encode())
            self._proc.stdin.flush()
            ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
            if not ready:
                os.killpg(self._proc.pid, signal.SIGKILL)  # the server and the children it forked
                self._proc.wait()
                self._proc = None
                raise subprocess.TimeoutExpired(commands[0][0], timeout)
            codes = json.loads(self._proc.stdout.readline())
            return [
                subprocess.CompletedProcess(
                    ["dpo-jax", *argv], code, Path(r["stdout"]).read_text(), Path(r["stderr"]).read_text()
                )  # fmt: skip
                for (argv, _), code, r in zip(commands, codes, requests, strict=True)
            ]

    def run(self, argv: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run_many([(argv, env)], timeout)[0]


ZYGOTE = Zygote()

if __name__ == "__main__":
    serve()

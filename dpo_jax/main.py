"""The ``dpo-jax`` command: ``dpo-jax train --config configs/default.py --workdir runs/x [--config.a.b=v ...]``.

Multi-host: on TPU pods pass ``--distributed`` (JAX finds its peers); elsewhere also ``--coordinator_address``,
``--num_processes`` and ``--process_id`` (CPU processes use gloo collectives).

Exit status: 0 done; 2 a problem the user can fix (bad config, data, model folder, workdir), printed as one line
``dpo-jax: <what> in <file/field>: <expected>`` (``--verbose`` adds the traceback); 1 a NaN/Inf stop; 143 / 130
SIGTERM / Ctrl-C (the step is saved: rerun the same command to resume).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
import threading
import traceback
from pathlib import Path

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dpo_jax.config import load_config_file
from dpo_jax.errors import NonFiniteLoss, UserError
from dpo_jax.infra import signals, xla_flags
from dpo_jax.infra.signals import Preempted
from dpo_jax.infra.workdir import flatten, os_error
from dpo_jax.research import sweep
from dpo_jax.research.rounds import run_rounds
from dpo_jax.research.sweep import member_name
from dpo_jax.training.train import train

COMMANDS = {
    "train": "train a policy (SFT reference stage if configured, then DPO) from a config file",
    "sweep": "run the sweep declared in a config file (--mode=sequential|vectorized) or export it (--mode=export)",
    "rounds": "iterative (online) DPO: sample from the policy, pair best vs worst by the reward, train; repeat",
}
USAGE = (
    "usage: dpo-jax {train,sweep,rounds} --config configs/<name>.py[:arg] --workdir <dir> [--config.<field>=<v> ...]\n"
    + "\n".join(f"  {k:<8}{v}" for k, v in COMMANDS.items())
)


def _config_arg(argv: list[str]) -> str | None:
    """The value of ``--config X`` / ``--config=X``, if given."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _config_spec(argv: list[str]) -> str:
    value = _config_arg(argv)
    if value is None:
        raise SystemExit(f"dpo-jax: --config is required\n{USAGE}")
    return value


def _run(command: str, argv: list[str], argv_full: list[str]) -> int:
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        print(f"dpo-jax: unexpected arguments {argv[1:]}\n{USAGE}", file=sys.stderr)
        return 2
    if FLAGS.coordinator_address or FLAGS.distributed:
        if FLAGS.num_processes > 1:  # CPU collectives across processes (no effect on GPU / TPU)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kw = {}
        if FLAGS.coordinator_address:
            kw = dict(
                coordinator_address=FLAGS.coordinator_address,
                num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id,
            )
        jax.distributed.initialize(**kw)
    if command in ("train", "rounds") and FLAGS.config is None:
        print(f"dpo-jax: --config is required\n{USAGE}", file=sys.stderr)
        return 2

    def fail(message: str, code: int) -> int:
        if FLAGS.verbose:
            traceback.print_exc()
        print(f"dpo-jax: {message}", file=sys.stderr)
        return code

    try:
        if command == "sweep":
            if FLAGS.mode == "export":
                for kind, path in sweep.export_sweep(_config_spec(argv_full), FLAGS.workdir, base=FLAGS.config).items():
                    print(f"{kind}: {path}")
            else:
                sweep.run_sweep(_config_spec(argv_full), FLAGS.workdir, base=FLAGS.config, mode=FLAGS.mode)
            return 0
        if command == "rounds":
            run_rounds(FLAGS.config, FLAGS.workdir)
            return 0
        workdir = FLAGS.workdir
        if FLAGS.member_subdir:  # W&B sweep agents: one subfolder per member, named by its overrides
            overrides = dict(a[len("--config.") :].split("=", 1) for a in argv_full if a.startswith("--config."))
            overrides = {k: v for k, v in overrides.items() if not k.startswith("wandb.")}
            workdir = str(Path(workdir) / member_name(overrides))
        train(FLAGS.config, workdir)
    except UserError as e:
        return fail(str(e), 2)
    except OSError as e:  # a full disk, a read-only or missing path the user named
        converted = os_error(e, e.filename or FLAGS.workdir)
        if converted is e and not isinstance(e, FileNotFoundError):
            raise
        return fail(str(converted), 2)
    except Preempted as e:
        return fail(str(e), e.exit_code)
    except NonFiniteLoss as e:
        return fail(str(e), 1)
    except KeyboardInterrupt:  # the second Ctrl-C (abort without saving), or one before the run's handlers were set
        if signals.requested():
            return fail("aborted (second Ctrl-C); the last checkpoint is kept", 130)
        return fail("interrupted (Ctrl-C) before the run could save anything; the last checkpoint is kept", 130)
    return 0


class _LibraryErrors:
    """A logging filter: drops the records of Orbax's asynchronous writer and of asyncio."""

    def filter(self, record) -> bool:
        return record.name != "asyncio" and "/orbax/" not in record.pathname.replace("\\", "/")


def quiet_library_errors() -> None:
    """Without ``--verbose``, the tracebacks libraries print from their own threads are not shown: Orbax's
    asynchronous writer reports a full disk from each of its threads and tasks (hundreds of lines), while the
    run's own one-line error says what happened and what to do."""
    sys.unraisablehook = lambda args: None  # "Exception ignored in ..." from callbacks on a closed event loop
    threading.excepthook = lambda args: None  # an exception that ends a library's thread
    absl_logging.get_absl_handler().addFilter(_LibraryErrors())
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def _flag_error(error: Exception, argv: list[str]) -> str:
    """A config-flag error as one line: the config file's own error, or a mistyped ``--config.a.b`` with the
    nearest field name."""
    spec = _config_arg(argv)
    try:
        known = set(flatten(load_config_file(spec).to_dict()))
    except Exception as e:
        return f"invalid config in --config {spec}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
    sections = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            field = arg[len("--config.") :].split("=", 1)[0]
            if field not in known and field not in sections:
                near = difflib.get_close_matches(field, sorted(known), n=1)
                hint = f"did you mean --config.{near[0]}?" if near else "no such field"
                return f"unknown config field in --config.{field} ({spec}): {hint}"
    line = str(error).strip().splitlines()[0]
    typed = re.match(r"flag --config\.(\S+?)=(.*?): (invalid literal for|could not convert)", line)
    if typed and typed.group(1) in known:  # a value of the wrong type for its field (absl's int() / float() text)
        field, value = typed.group(1), typed.group(2)
        default = flatten(load_config_file(spec).to_dict())[field]
        kind = {int: "an integer", float: "a number", bool: "true or false"}.get(type(default), type(default).__name__)
        return f"config.{field}: expected {kind} (like its default {default!r}), got {value!r}"
    return line


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    command = argv.pop(1)
    xla_flags.apply()  # before JAX starts its backend (importing JAX does not start it; the first device use does)

    if "workdir" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "configs/<name>.py[:arg]", lock_config=True)
        flags.DEFINE_string("workdir", "runs/default", "where checkpoints, logs, plots and exports go")
        flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (TPU pods, SLURM)")
        flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs")
        flags.DEFINE_integer("num_processes", 1, "number of processes")
        flags.DEFINE_integer("process_id", 0, "this process's index")
        flags.DEFINE_enum(
            "mode",
            "sequential",
            ["sequential", "vectorized", "export"],
            "sweep: members one after another, all in one vmapped program, or exported as jobs",
        )
        flags.DEFINE_bool("member_subdir", False, "train: use <workdir>/<member name from the overrides>")
        flags.DEFINE_bool("verbose", False, "print the full traceback of an error, not just its one-line message")
    spec = _config_arg(argv)
    if spec is not None and not Path(spec.split(":", 1)[0]).is_file():
        print(f"dpo-jax: config file not found in --config: {spec.split(':', 1)[0]}", file=sys.stderr)
        return 2
    result = {}

    def parse(args):
        """Flags as one-line errors: a mistyped --config field, a get_config() that raises."""
        try:
            return flags.FLAGS(args)
        except Exception as e:  # flags.Error, or what get_config() / an override raised
            message = _flag_error(e, args)
        if "--verbose" in args:
            traceback.print_exc()
        print(f"dpo-jax: {message}", file=sys.stderr)
        result["code"] = 2
        raise SystemExit(2)

    def absl_main(rest):
        absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and JAX log every checkpoint step at INFO
        if not flags.FLAGS.verbose:
            quiet_library_errors()
        result["code"] = _run(command, rest, argv)

    try:
        app.run(absl_main, argv=argv, flags_parser=parse)
    except SystemExit as e:
        if e.code not in (0, None) and "code" not in result:
            raise
    return result.get("code", 0)


def console_main() -> None:
    raise SystemExit(main())

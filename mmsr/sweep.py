"""``mmsr sweep SWEEP.yaml``: run a wandb sweep file locally, without the wandb server.

A sweep file (``configs/sweeps/*.yaml``) is an ordinary wandb sweep configuration whose parameter
names are dotted ``mmsr fit`` keys (``model.kl_coef``, ``model.reward.search_penalty``), so online
it runs as usual (``wandb sweep FILE`` then ``wandb agent ID``): the agent puts ``--key=value`` in the
command's ``${args}`` and LightningCLI sets that ``__init__`` argument.

wandb's agent needs the server even for a local controller (the sweep and its runs are stored
there), so offline this runner plays both parts: it expands ``grid`` or ``random`` parameters itself
and runs the file's ``command`` once per parameter set, with wandb's command macros filled the way
the agent fills them. Differences: ``${interpreter}`` is this Python (the agent uses ``python`` on
PATH), ``bayes`` search and early termination need the server and are refused, and every run of one
invocation shares ``WANDB_RUN_GROUP`` so offline runs can be compared once synced. Each command is
printed with ``${envvar:NAME}`` as written, so a value the command takes from the environment stays out of
the console and its logs; but the run gets it on its command line, which wandb records in the run's metadata
(its ``args``). Secrets therefore reach a run only through the environment variables its ``*_env`` settings
name (``api_key_env: SERPER_API_KEY``, inherited by every run), never through ``${envvar:}`` in its arguments.

    mmsr sweep configs/sweeps/smoke_kl_group.yaml --count 2 -- --trainer.max_steps 1

Arguments after ``--`` are appended to every command (after ``${args}``, so they win).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")  # wandb's default
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "log_uniform_values")
RANGE_DISTRIBUTIONS = DISTRIBUTIONS[2:]  # those of a min..max parameter: the others take 'value' / 'values'
# wandb's agent's pattern (``SWEEP_COMMAND_ENV_VAR_REGEX``): ``${envvar:lower}`` is not filled, left as written
_ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")
# the macros that write a value as ``str(value)``, as wandb's agent does: ``None`` becomes ``None``
STR_MACROS = ("${args}", "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}")


@dataclass(frozen=True)
class Parameter:
    """One swept key: ``values`` (constant / categorical) or a ``min``..``max`` range."""

    name: str
    distribution: str
    values: tuple[Any, ...] = ()
    probabilities: tuple[float, ...] | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (the parts the local runner uses)."""

    name: str
    method: Literal["grid", "random"]
    parameters: tuple[Parameter, ...]
    command: tuple[str, ...]
    program: str | None = None
    run_cap: int | None = None


def _parameter(name: str, spec: Any, where: str) -> Parameter:
    if not isinstance(spec, dict) or "parameters" in spec:
        raise ValueError(
            f"{where}: parameter {name!r} must be a mapping with value/values/min+max "
            "(nested parameters are not supported: name it by its dotted key)"
        )
    if "value" in spec:
        return Parameter(name, "constant", (spec["value"],))
    if "values" in spec:
        return _categorical(name, spec, where)
    if "min" not in spec or "max" not in spec:
        raise ValueError(f"{where}: parameter {name!r} needs 'value', 'values' or 'min' and 'max'")
    return _range(name, spec, where)


def _categorical(name: str, spec: dict, where: str) -> Parameter:
    """A ``values`` parameter, optionally weighted by ``probabilities`` (both YAML lists)."""
    values = tuple(_listed(spec["values"], f"parameter {name!r}: 'values'", where))
    probs = spec.get("probabilities")
    if probs is not None:
        probs = tuple(_listed(probs, f"parameter {name!r}: 'probabilities'", where))
        if not all(_weight(w) for w in probs):
            raise ValueError(f"{where}: parameter {name!r}: 'probabilities' {list(probs)!r} must be numbers >= 0")
    if not values or (probs is not None and (len(probs) != len(values) or not math.isclose(sum(probs), 1.0))):
        raise ValueError(
            f"{where}: parameter {name!r}: 'values' must be non-empty, 'probabilities' match it and sum to 1"
        )
    return Parameter(name, "categorical", values, probs)


def _listed(value: Any, what: str, where: str) -> list:
    """``value`` if it is a YAML list: a string or mapping would be split into its characters or keys."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: {what} must be a YAML list ([a, b] or one '- item' a line), "
                         f"got {type(value).__name__} {value!r}")  # fmt: skip
    return value


def _weight(w: Any) -> bool:
    """Whether ``w`` can be a categorical probability (YAML ``true`` is a bool, not 1)."""
    return isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0


def _range(name: str, spec: dict, where: str) -> Parameter:
    """A ``min``..``max`` parameter; YAML integers for both bounds make it ``int_uniform`` unless told."""
    lo, hi = (_bound(name, key, spec[key], where) for key in ("min", "max"))
    default = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    dist = spec.get("distribution", default)
    if dist not in RANGE_DISTRIBUTIONS:
        raise ValueError(
            f"{where}: parameter {name!r}: distribution {dist!r} is not supported offline "
            f"(supported: {', '.join(RANGE_DISTRIBUTIONS)})"
        )
    if dist == "int_uniform" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise ValueError(f"{where}: parameter {name!r}: int_uniform needs whole-number min and max, got {lo}, {hi}")
    if not lo < hi or (dist == "log_uniform_values" and lo <= 0):
        raise ValueError(f"{where}: parameter {name!r}: need 0 < min < max for log_uniform_values, min < max otherwise")
    return Parameter(name, dist, min=lo, max=hi)


def _bound(name: str, key: str, value: Any, where: str) -> int | float:
    """``min`` / ``max`` as a number: PyYAML (YAML 1.1) reads ``1e-5``, without a dot, as the string "1e-5"."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError(f"{where}: parameter {name!r}: {key} {value!r} is not a finite number")
    return number


def load_sweep(path: str | Path) -> Sweep:
    """Parses and checks a sweep file; errors name the file and the offending key."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:  # its own message names "<unicode string>" and ends on a caret line
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise ValueError(f"{where}: a sweep file is a mapping with a non-empty 'parameters' mapping")
    method = raw.get("method")
    if method not in ("grid", "random"):
        raise ValueError(
            f"{where}: method {method!r} cannot run offline "
            f"(grid or random; bayes needs the wandb server: wandb sweep {where})"
        )
    if raw.get("early_terminate"):
        raise ValueError(f"{where}: early_terminate needs the wandb server; remove it to run offline")
    params = tuple(_parameter(k, v, where) for k, v in raw["parameters"].items())
    if method == "grid" and (bad := [p.name for p in params if p.min is not None]):
        raise ValueError(f"{where}: grid search needs 'value' or 'values', not a range, for {', '.join(bad)}")
    command = tuple(str(c) for c in _listed(raw.get("command", list(DEFAULT_COMMAND)), "'command'", where))
    if not command:
        raise ValueError(f"{where}: 'command' is empty; leave it out to run wandb's default command")
    _check_nulls(params, command, where)
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise ValueError(f"{where}: run_cap {run_cap!r}: a whole number of runs, at least 1")
    return Sweep(raw.get("name") or Path(path).stem, method, params, command, raw.get("program"), run_cap)


def _check_nulls(params: tuple[Parameter, ...], command: tuple[str, ...], where: str) -> None:
    """A ``null`` value reaches the run as ``--key=None`` (wandb's agent writes ``str(value)``; so does this
    runner, so a file that runs here runs online), which ``mmsr fit`` refuses: every run it is in would fail."""
    macro = next((m for m in STR_MACROS if m in command), None)
    for p in params:
        if macro is not None and None in p.values:
            raise ValueError(f"{where}: parameter {p.name!r}: a null value is written --{p.name}=None by {macro}, "
                             "which mmsr fit refuses; leave the parameter out to keep the config's value")  # fmt: skip


def grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination, the first parameter varying slowest."""
    names = [p.name for p in sweep.parameters]
    return [dict(zip(names, combo)) for combo in itertools.product(*(p.values for p in sweep.parameters))]


def draw(p: Parameter, rng: random.Random) -> Any:
    """One value of ``p`` under its distribution."""
    if p.distribution == "constant":
        return p.values[0]
    if p.distribution == "categorical":
        return rng.choices(p.values, weights=p.probabilities)[0]
    if p.distribution == "int_uniform":
        return rng.randint(int(p.min), int(p.max))
    if p.distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
    return rng.uniform(p.min, p.max)


def parameter_sets(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs' parameters: the grid's first ``n``, or ``n`` random draws, ``n`` the smaller of ``count`` and
    ``run_cap`` (wandb's server stops any sweep at ``run_cap`` runs); a grid without either runs whole."""
    n = min((c for c in (count, sweep.run_cap) if c is not None), default=None)
    if sweep.method == "grid":
        return grid(sweep)[:n]
    if n is None:
        raise ValueError(f"random sweep {sweep.name!r} runs forever: give --count or run_cap")
    rng = random.Random(seed)
    return [{p.name: draw(p, rng) for p in sweep.parameters} for _ in range(n)]


def command_for(sweep: Sweep, params: dict[str, Any], extra: list[str] = (), expand_env: bool = True) -> list[str]:
    """The command of one run, with wandb's macros filled as its agent fills them; ``expand_env=False`` leaves
    ``${envvar:NAME}`` as written (the command as printed: a key passed through the environment stays out of logs)."""
    macros = {
        "env": ["/usr/bin/env"] if os.name == "posix" else [],
        "interpreter": [sys.executable],
        "program": [sweep.program] if sweep.program else [],
        "args": [f"--{k}={v}" for k, v in params.items()],
        "args_no_equals": [x for k, v in params.items() for x in (f"--{k}", str(v))],
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
    }
    out: list[str] = []
    for chunk in sweep.command:
        if expand_env:
            chunk = _ENVVAR.sub(lambda m: os.environ.get(m.group(1), m.group(1)), chunk)
        if chunk.startswith("${") and chunk.endswith("}") and not _ENVVAR.fullmatch(chunk):
            if chunk[2:-1] not in macros:
                raise ValueError(f"sweep {sweep.name!r}: unknown command macro {chunk} (known: {', '.join(macros)}, "
                                 "and envvar:NAME, NAME of A-Z, 0-9 and _ as wandb's agent reads it)")  # fmt: skip
            out += macros[chunk[2:-1]]
        else:
            out.append(chunk)
    return out + list(extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmsr sweep", description=__doc__.split("\n")[0])
    parser.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--count", type=int, default=None, help="number of runs, at most run_cap (grid: the first N)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random search")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.count is not None and args.count < 1:
        parser.error(f"--count {args.count}: the number of runs, at least 1")
    try:
        sweep = load_sweep(args.sweep)
        runs = [(command_for(sweep, p, extra), command_for(sweep, p, extra, expand_env=False))
                for p in parameter_sets(sweep, args.count, args.seed)]  # fmt: skip
    except (OSError, ValueError, yaml.YAMLError) as exc:
        parser.exit(2, f"mmsr sweep: error: {exc}\n")
    env = os.environ | {"WANDB_RUN_GROUP": f"sweep-{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"}
    failed = 0
    for i, (cmd, shown) in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {' '.join(shown)}", flush=True)
        if not args.dry_run:
            code = _run(cmd, env, f"[{i}/{len(runs)}]")
            failed += code != 0
            print(f"[{i}/{len(runs)}] exit code {code}", flush=True)
    if failed:
        parser.exit(1, f"mmsr sweep: {failed} of {len(runs)} runs of {args.sweep} failed\n")
    return 0


def _run(cmd: list[str], env: dict[str, str], tag: str) -> int:
    """One run's exit code; a program that cannot be started (not on PATH, not executable) fails that run
    with 127, the shell's "command not found", and the sweep goes on to the next."""
    try:
        return subprocess.run(cmd, env=env, check=False).returncode
    except OSError as exc:
        print(f"{tag} cannot start {cmd[0]}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 127

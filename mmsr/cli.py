"""``mmsr fit -c configs/x.yaml`` and the other ``mmsr`` commands.

``fit`` / ``validate`` are LightningCLI over ``GRPOModule`` and ``MMSRDataModule``: engines, tools,
rewards and policies are ``class_path`` / ``init_args`` entries (the config is the registry), and any
``__init__`` argument can be overridden with its dotted key (``--model.kl_coef 0``). The other
commands are plain argparse programs, looked up in ``COMMANDS``; ``mmsr --help`` lists them all.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
import warnings

from mmsr.cli_checks import (LIGHTNING_CKPT_NAMES, add_final_checkpoint, check_inputs_exist, check_manual_optimization,
                             check_step_settings, check_tools_ready, check_wandb_login,
                             refuse_function_init_args)
from mmsr.cli_errors import config_syntax_line, parse_error_line

# command -> ("module:function" taking the remaining argv, what it does: ``mmsr --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mmsr.demo.run:main", "the CPU demo: a tiny VLM learns when to search, end to end on 2 cores"),
    "export": ("mmsr.export:main", "a training checkpoint -> a Hugging Face model directory"),
    "eval": ("mmsr.eval.cli:main", "greedy evaluation of a checkpoint or a model over eval sets"),
    "curate": ("mmsr.eval.curate:main", "the paper's search-balancing of training data"),
    "report": ("mmsr.report.cli:main", "an offline HTML report of a run directory"),
    "sweep": ("mmsr.sweep:main", "run a wandb sweep file locally, without the wandb server"),
    "serve-search": ("mmsr.tools.server:main", "the configured search backends and their cache behind a JSON API"),
    "plan": ("mmsr.plan:main", "does a run fit on its GPUs? its memory, term by term"),
}
# LightningCLI's subcommands over the config's module and data
TRAINER_COMMANDS = {"fit": "train (GRPO, or the module the config names)", "validate": "one validation pass",
                    "test": "one test pass", "predict": "one prediction pass"}  # fmt: skip


# Lightning warnings that never apply to mmsr's modules, silenced so that the ones left are worth reading:
NOT_APPLICABLE = (
    # Lightning's own call into torch's pytree (nothing a user can change)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # no ``val_files``: validation is off, as meant (an empty training set is refused before this)
    r"Total length of `\w+` across ranks is zero",
    r"You defined a `validation_step` but have no `val_dataloader`",
    # the modules keep samples (PIL images, text) on the host: their own ``transfer_batch_to_device`` on purpose
    r"You have overridden `transfer_batch_to_device` in `LightningModule` but have passed in a `LightningDataModule`",
    # a step's checkpoint is meant to hold the weights after its update (it prints a screen of example code)
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
)

# Lightning's --optimizer / --lr_scheduler (``auto_configure_optimizers``) override a module's configure_optimizers,
# and mmsr's modules step and re-apply their own AdamW and schedule: not offered. Run configs saved while they
# were hold them as ``null``, so the keys stay, hidden, taking only that.
OWN_OPTIMIZATION = ("optimizer", "lr_scheduler")

# Lightning's advertisement for its hosted logger, printed by every Trainer (an info record, not a warning)
ADVERTS = (r"💡 Tip: For seamless cloud logging",)


def _not_an_advert(record) -> bool:
    return not any(re.match(pattern, str(record.msg)) for pattern in ADVERTS)


def lightning_cli(args: list[str] | None = None, parse_only: bool = False, **kwargs):
    """LightningCLI over the module and data; ``parse_only`` validates a config without building it."""
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from mmsr.callbacks.requeue import StepBoundaryRequeue, hpc_resume_path
    from mmsr.callbacks.run_dir import (LoggedConfig, RunDirectory, checkpoint_runs, continue_metrics,
                                        explicit_default_logger, repoint_loggers)
    from mmsr.data.datamodule import MMSRDataModule

    for message in NOT_APPLICABLE:
        warnings.filterwarnings("ignore", message=message)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if _not_an_advert not in rank_zero_log.filters:
        rank_zero_log.addFilter(_not_an_advert)

    class MMSRCLI(LightningCLI):
        hpc_ckpt: str | None = None  # the hpc checkpoint a fit without --ckpt_path resumes from (SLURM requeue)

        def add_arguments_to_parser(self, parser) -> None:
            for key in OWN_OPTIMIZATION:  # hidden: a config's ``null`` passes, anything else is refused
                parser.add_argument(f"--{key}", type=_null_only(key), default=None, help=argparse.SUPPRESS)

        def before_instantiate_classes(self) -> None:
            # `fit --ckpt_path` continues the checkpoint's run directory and wandb run (callbacks/run_dir.py).
            ckpt = self.config.fit.get("ckpt_path") if self.subcommand == "fit" else None
            if ckpt in LIGHTNING_CKPT_NAMES:  # Lightning would find the file, but only after the loggers exist
                raise ValueError(f"--ckpt_path {ckpt}: give the checkpoint file (e.g. runs/x/csv/version_0/checkpoints/"
                                 "last.ckpt): a resumed run continues its run directory and metrics, read from that file")  # fmt: skip
            config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: not nested
            if not parse_only:
                check_inputs_exist(config)
            # no subcommand (run=False): a run's config, parsed for its caller (`mmsr plan` sizes it, the demo
            # fits it), so a run `mmsr fit` refuses is refused there too; reading the config builds nothing
            if self.subcommand in ("fit", None):
                check_step_settings(config)
            # a requeued SLURM job's fit (no --ckpt_path): Lightning resumes from the hpc checkpoint, continued alike
            if self.subcommand == "fit" and not ckpt and not parse_only:
                ckpt = self.hpc_ckpt = hpc_resume_path(config.trainer)
            if ckpt and (runs := checkpoint_runs(ckpt)):
                explicit_default_logger(config.trainer)
                repoint_loggers(config.trainer.logger, runs)
            if not parse_only:
                check_tools_ready(config.model, config.get("config"))
                if self.subcommand == "fit":
                    check_wandb_login(config.trainer)

        def parse_arguments(self, parser, args) -> None:
            refuse_function_init_args(sys.argv[1:] if args is None else list(args or []), cwd)
            super().parse_arguments(parser, args)

        def _set_seed(self) -> None:
            # ``seed_everything: false`` seeds nothing, and the engines' and data's unset seeds are then 0: not a
            # PL_GLOBAL_SEED left by a shell's export or an earlier run in this process (``mmsr.checks.run_seed``)
            seed = self._get(self.config, "seed_everything")
            if seed is False:
                os.environ.pop("PL_GLOBAL_SEED", None)
            if type(seed) is int and not 0 <= seed <= 2**32 - 1:  # numpy's range; Lightning's error named no key
                raise ValueError(f"seed_everything={seed}: must be 0..2**32-1, or true for a random seed")
            super()._set_seed()

        def _parse_ckpt_path(self) -> None:
            """Nothing: the config wins on resume. Lightning merges a checkpoint file's hyper-parameters over it
            (not a sharded directory's), so a run resumed with another lr, kl_coef or export_dir ran with the first
            run's while its config.yaml said otherwise, and it loaded the whole checkpoint on the CPU to read them."""

        def instantiate_classes(self) -> None:
            if not parse_only:
                super().instantiate_classes()

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            if not any(isinstance(c, RunDirectory) for c in trainer.callbacks):
                trainer.callbacks.append(RunDirectory())  # every checkpoint records its run directory
            if not any(isinstance(c, StepBoundaryRequeue) for c in trainer.callbacks):
                trainer.callbacks.append(StepBoundaryRequeue())  # SLURM's requeue saves at the end of a step
            add_final_checkpoint(trainer)
            return trainer

        def before_fit(self) -> None:
            check_manual_optimization(self.trainer, self.model)
            # before the CSV logger opens (and empties) its directory
            if self.config.fit.get("ckpt_path") or self.hpc_ckpt:
                for logger in self.trainer.loggers:
                    if isinstance(logger, CSVLogger):
                        continue_metrics(logger)

    class MMSRParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            # jsonargparse nests a union's alternatives (``model`` is ``LightningModule | None``) and ends with a
            # dump of the value given, not the key at fault: one more line names it. Only where the parser exits:
            # a nested parser raises, and its message becomes part of its parent's. A config file's YAML syntax
            # error names no file: that line names it.
            brief = None
            if self.exit_on_error:
                argv = sys.argv[1:] if args is None else args
                brief = parse_error_line(message) or config_syntax_line(message, argv, cwd)
            super().error(message if brief is None else f"{message}\nerror: {brief}", ex)

    cwd = os.getcwd()  # the command line's relative paths: jsonargparse enters a config's folder to parse it
    # Any LightningModule (GRPOModule, SFTModule, a user's subclass) by class_path.
    return MMSRCLI(
        None,
        MMSRDataModule,
        parser_class=MMSRParser,
        subclass_mode_model=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        **{"save_config_callback": LoggedConfig, "auto_configure_optimizers": False, **kwargs},
    )


class NotOffered(argparse.ArgumentTypeError, ValueError):
    """A hidden key given a value. argparse reports an ``ArgumentTypeError`` from the command line as its parser
    error; jsonargparse checks a config file's values itself and reports only ``TypeError`` / ``ValueError`` that
    way (any other exception escaped as a traceback)."""


def _null_only(key: str):
    """The type of the hidden ``--optimizer`` / ``--lr_scheduler``: ``null`` (in a config file), nothing else."""

    def null_only(value):
        if value is None:
            return None
        raise NotOffered(
            f"mmsr does not take Lightning's {key}: the module configures its own optimizer and lr schedule "
            "(mmsr's modules: model.lr, model.weight_decay, model.lr_schedule, model.warmup_steps, model.total_steps)")

    return null_only


def usage() -> str:
    """``mmsr --help``: every command, LightningCLI's and mmsr's own (each takes ``--help`` too)."""
    width = max(map(len, [*TRAINER_COMMANDS, *COMMANDS]))
    lines = ["usage: mmsr COMMAND [--help] ...", "",
             "training (LightningCLI: mmsr fit -c CONFIG.yaml [--model.KEY VALUE ...]):"]  # fmt: skip
    lines += [f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "tools:"] + [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(args: list[str] | None = None):
    argv = sys.argv[1:] if args is None else args
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):  # Lightning's own help would list its four subcommands only
        print(usage())
        return None
    if argv[0] in COMMANDS:
        module, func = COMMANDS[argv[0]][0].split(":")
        return getattr(importlib.import_module(module), func)(argv[1:])
    return lightning_cli(args)


def console() -> None:
    """The ``mmsr`` console script (and ``python -m mmsr``): ``main`` returns its result (tests use it),
    but a script's return value becomes its exit status, so the script discards it.

    A failure ends with the traceback and then one line naming the cause: the innermost exception of
    the chain (jsonargparse wraps a constructor's error in several screens of namespace dumps). Both have
    secrets masked (``mmsr.tools.secrets.redact``).
    """
    try:
        main()
    except Exception as exc:  # noqa: BLE001 - the last line a user sees must name the cause
        from mmsr.tools.secrets import redact

        # masked as log records are: jsonargparse's errors quote the config given, a key pasted into it too
        print(redact(traceback.format_exc()), end="", file=sys.stderr)
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "fit")
        print(redact(f"mmsr {command}: error: {cause(exc)}"), file=sys.stderr)
        raise SystemExit(1) from None


def cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception in ``exc``'s chain (its first line only), the chain as Python
    prints it: an error raised ``from None`` ends it, its message already says more than the one it hides (a
    ``DataError`` naming the file and line, not the ``JSONDecodeError`` it replaced). A jsonargparse parse error
    in the chain names itself by its outermost message's one line (``parse_error_line``): the inner ones lose
    the key (``NSKeyError: Option 'top' is not accepted``). An exception whose class sets ``names_its_cause``
    ends the chain too (``mmsr.reward.base.RewardError``): its message names where the error came from, then the
    inner one's type and message, which alone said ``KeyError: 'oops'`` and not which reward raised it. So does an
    exception whose message quotes the one it was raised from (``_embeds``): it names the file that one did not."""
    seen, brief = set(), None
    while True:
        if brief is None and (line := parse_error_line(str(exc))) is not None:
            brief = f"{type(exc).__name__}: {line}"
        inner = None if getattr(exc, "names_its_cause", False) else _shown_inner(exc)
        if inner is None or id(inner) in seen or _embeds(exc, inner):
            break
        seen.add(id(exc))
        exc = inner
    lines = str(exc).strip().splitlines() or [""]
    return brief or f"{type(exc).__name__}: {lines[0]}"


def _embeds(outer: BaseException, inner: BaseException) -> bool:
    """Whether ``outer``'s first line, the one shown, holds ``inner``'s (its parse error's line, else its first
    line): mmsr's own error raised ``from`` the one it explains, naming the file or row that one did not (``x.ckpt is
    not a checkpoint torch.load can read: [Errno 22] Invalid argument`` ended as ``OSError: [Errno 22] Invalid
    argument``). A message that only dumps it further down, or says no more than it (jsonargparse's nested unions
    of alternatives all begin alike), gives way."""
    text, shown = str(inner).strip(), (str(outer).strip().splitlines() or [""])[0].strip()
    said = parse_error_line(text) or (text.splitlines()[0].strip() if text else "")
    return len(said) >= 4 and said in shown and len(shown) > len(said)


def _shown_inner(exc: BaseException) -> BaseException | None:
    """The exception Python's traceback prints before ``exc``: its ``__cause__``, else its ``__context__`` unless
    that was suppressed (``raise ... from None``)."""
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__

"""The one command-line shell: shared options, logging set-up, params loading, and errors as exit status 2."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.params import Params

log = logging.getLogger("pipeline")

DEFAULT_PARAMS = "params.yaml"
EXIT_BAD_INPUT = 2  # bad params, flags or data, or a missing prerequisite: the message says which
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HANDLER_NAME = "coop-cli"  # the root-logger handler setup_logging installs

Command = Callable[[argparse.Namespace, "Params | None"], "int | None"]


def parser(prog: str, doc: str | None, epilog: str | None = None, params: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every command shares: --params (where params are read) and --log-level."""
    result = argparse.ArgumentParser(prog=prog, description=doc, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if params:
        result.add_argument("--params", type=Path, metavar="PATH",
                            help="params file, e.g. configs/paper_rn50.yaml (default: params.yaml when the current "
                            "folder has one, else the defaults of pipeline/params.py)")
    result.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log messages from this level up (default: %(default)s)")
    return result


def add_device(parser: argparse.ArgumentParser, what: str = "the model") -> None:
    """--device with the same default and meaning in every command."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"where {what} runs: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda, "
                        "cuda:N (default: %(default)s)")


# The epilog of commands that take both --device and train.device (cli.with_device).
WITH_DEVICE_NOTE = "--device other than auto overrides train.device; left at auto, train.device decides."


def with_device(params: Params, device: str) -> Params:
    """params with train.device set to --device, unless --device was left at its default (auto)."""
    from pipeline.params import override

    return params if device == "auto" else override(params, train={"device": device})


def _quiet_root_info(record: logging.LogRecord) -> bool:
    # open_clip logs its model-loading chatter at INFO on the root logger itself.
    return record.name != "root" or record.levelno >= logging.WARNING


def setup_logging(level: str = "INFO") -> None:
    """One log format for every command; open_clip's root-logger INFO chatter is dropped.

    Replaces only the handler an earlier call installed (a command run twice in one process): handlers
    others put on the root logger, such as pytest's log capture, keep receiving the records.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_quiet_root_info)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))


def _load_params(path: Path | None) -> Params:
    """--params if given (it must exist), else ./params.yaml if there is one, else the typed defaults."""
    from pipeline.params import Params, load_params

    if path is None:
        path = Path(DEFAULT_PARAMS)
        if not path.is_file():
            log.info("no %s in %s: using the defaults of pipeline/params.py and the flags", path, Path.cwd())
            return Params()
    return load_params(path)


def run(parser: argparse.ArgumentParser, command: Command, argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, set up logging, load --params, run `command(args, params)`; a UserError exits with 2."""
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        params = _load_params(args.params) if hasattr(args, "params") else None
        status = command(args, params)
    except (UserError, FileNotFoundError) as error:
        log.error("%s", error)
        return EXIT_BAD_INPUT
    return 0 if status is None else int(status)

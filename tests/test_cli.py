"""The command-line shell: logging set-up keeps others' handlers and never doubles its own."""

from __future__ import annotations

import logging

import pytest

from pipeline import cli


@pytest.fixture
def root_handlers():
    """The root logger's handlers and level, restored after the test."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = saved
    root.setLevel(level)


def test_setup_logging_keeps_foreign_handlers_and_replaces_its_own(root_handlers, caplog) -> None:
    foreign = logging.NullHandler()
    root_handlers.addHandler(foreign)
    cli.setup_logging("INFO")
    cli.setup_logging("WARNING")  # a second command in the same process
    ours = [h for h in root_handlers.handlers if h.get_name() == cli.HANDLER_NAME]
    assert len(ours) == 1 and foreign in root_handlers.handlers
    assert root_handlers.level == logging.WARNING
    logging.getLogger("pipeline.test").warning("seen by pytest's capture")
    assert "seen by pytest's capture" in caplog.text


def test_setup_logging_drops_only_the_root_loggers_info_chatter(root_handlers) -> None:
    cli.setup_logging("INFO")
    (ours,) = [h for h in root_handlers.handlers if h.get_name() == cli.HANDLER_NAME]

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    assert not ours.filter(record("root", logging.INFO))
    assert ours.filter(record("root", logging.WARNING)) and ours.filter(record("pipeline.x", logging.INFO))


def test_device_flag_overrides_train_device_only_when_given() -> None:
    from pipeline.params import params_from_dict

    params = params_from_dict({"train": {"device": "cpu"}})
    assert cli.with_device(params, "auto") is params  # left at its default: the params decide
    assert cli.with_device(params, "cuda:1").train.device == "cuda:1"
    assert cli.with_device(params, "cuda:1").train.lr == params.train.lr

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


def _command(args, params):
    if args.fail == "user":
        raise cli.UserError("features for FashionMNIST are missing; run the features stage")
    if args.fail == "other":
        raise RuntimeError("a bug")
    return params


def _parser():
    parser = cli.parser("test", "a test command")
    parser.add_argument("--fail", default="")
    return parser


def test_run_maps_user_errors_to_exit_2_with_the_message(root_handlers, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        assert cli.run(_parser(), _command, ["--fail", "user"]) == cli.EXIT_BAD_INPUT
    assert "run the features stage" in caplog.text
    with pytest.raises(RuntimeError, match="a bug"):  # a bug is not bad input: it keeps its traceback
        cli.run(_parser(), _command, ["--fail", "other"])


def test_params_default_to_the_folders_file_else_the_typed_defaults(root_handlers, tmp_path, monkeypatch,
                                                                     caplog) -> None:
    from pipeline.params import Params

    seen = []
    monkeypatch.chdir(tmp_path)
    assert cli.run(_parser(), lambda args, params: seen.append(params), []) == 0
    assert seen[-1] == Params()  # no params.yaml here
    (tmp_path / "params.yaml").write_text("data:\n  shots: [2]\n")
    assert cli.run(_parser(), lambda args, params: seen.append(params), []) == 0
    assert seen[-1].data.shots == [2]
    with caplog.at_level(logging.ERROR):  # an explicit --params must exist
        assert cli.run(_parser(), lambda args, params: None, ["--params", "missing.yaml"]) == cli.EXIT_BAD_INPUT
    assert "missing.yaml does not exist" in caplog.text


def _commands_with_params() -> list[str]:
    """Every command whose parser takes --params (stages.world, predict and import_context read none)."""
    import importlib

    from test_structure import commands

    return [c for c in commands()
            if "--params" in importlib.import_module(c).build_parser()._option_string_actions]


@pytest.mark.parametrize("command", _commands_with_params())
def test_every_command_reports_bad_params_with_exit_2(command, root_handlers, tmp_path, caplog) -> None:
    import importlib

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  precision: fp8\n")
    with caplog.at_level(logging.ERROR):
        assert importlib.import_module(command).main(["--params", str(bad)]) == cli.EXIT_BAD_INPUT
    assert "train.precision must be one of" in caplog.text


def test_an_unknown_architecture_is_bad_input(root_handlers, tmp_path, caplog) -> None:
    from stages import features as features_stage

    with caplog.at_level(logging.ERROR):
        assert features_stage.main(["--params", str(tmp_path / "none.yaml"), "--arch", "NoSuchNet"]) == 2
    params = tmp_path / "p.yaml"
    params.write_text(f"data:\n  datasets: [FashionMNIST]\n  splits_dir: {tmp_path}/splits\n")
    with caplog.at_level(logging.ERROR):
        assert features_stage.main(["--params", str(params), "--arch", "NoSuchNet"]) == 2
    assert "Unknown backbone architecture 'NoSuchNet'" in caplog.text

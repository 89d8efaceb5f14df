"""The command line's logging switches: ``-v``/``-vv``/``--log-level`` anywhere on the line set the ``distattr``
logger (and only it); the default shows warnings."""

from __future__ import annotations

import logging

import pytest

from distattr.cli import global_options_first, main


@pytest.fixture(autouse=True)
def distattr_logger_restored():
    logger = logging.getLogger("distattr")
    level, handlers = logger.level, list(logger.handlers)
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.mark.parametrize(("words", "level"), [
    (["methods"], logging.WARNING),
    (["-v", "methods"], logging.INFO),
    (["methods", "-vv"], logging.DEBUG),
    (["methods", "--log-level", "ERROR"], logging.ERROR),
    (["--log-level=info", "methods", "-vv"], logging.INFO),  # an explicit level wins over -v
])
def test_levels(words, level, capsys):
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    assert main(words) == 0
    assert logging.getLogger("distattr").level == level
    logging.getLogger("distattr.cli.test").info("a record at info")
    err = capsys.readouterr().err
    assert ("INFO distattr.cli.test: a record at info" in err) == (level <= logging.INFO)
    assert root.level == root_level and root.handlers == root_handlers  # other libraries' logging untouched


def test_global_options_move_before_the_subcommand_but_not_past_a_double_dash():
    assert global_options_first(["attribute", "x", "--debug", "-v", "--log-level", "info", "--", "-v"]) == [
        "--debug", "-v", "--log-level", "info", "attribute", "x", "--", "-v"]


def test_a_bad_level_is_one_line(capsys):
    assert main(["methods", "--log-level", "loud"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid choice: 'loud'" in err

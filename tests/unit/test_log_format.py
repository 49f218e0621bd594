"""worker.log_format: JSON lines for machines, readable lines on a terminal."""

from __future__ import annotations

import io
import json

import pytest
from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.formatter import LambdaPowertoolsFormatter
from click.testing import CliRunner

from worker.log_format import TextFormatter, configure_logging, resolve_log_format
from worker.observability import logger as worker_logger


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        if self.closed:  # as every io stream does
            raise ValueError("I/O operation on closed file")
        return self.tty


@pytest.mark.parametrize("requested, tty, expected", [
    ("auto", True, "text"), ("auto", False, "json"), ("json", True, "json"), ("text", False, "text"),
])
def test_auto_is_text_only_on_a_terminal(requested, tty, expected):
    assert resolve_log_format(requested, Stream(tty)) == expected


def test_auto_with_a_closed_or_missing_stream_is_json():
    closed = Stream(True)
    closed.close()
    assert resolve_log_format("auto", closed) == "json" and resolve_log_format("auto", None) == "json"
    with pytest.raises(ValueError):
        resolve_log_format("yaml", None)


def test_text_lines_keep_the_message_and_every_extra_key():
    stream = io.StringIO()
    log = Logger(service="t-text", stream=stream, logger_formatter=TextFormatter(service="t-text"))
    log.append_keys(job_id="job 7")
    log.info("message done", extra={"images": 3, "counts": {"ok": 2, "error": 1}})
    line = stream.getvalue().strip()
    assert "\n" not in line and not line.startswith("{")
    assert " INFO    message done  " in line
    assert 'job_id="job 7"' in line and "images=3" in line and 'counts={"ok":2,"error":1}' in line
    assert "service=" not in line and "location=" not in line


def test_an_exception_is_followed_by_its_traceback():
    stream = io.StringIO()
    log = Logger(service="t-exc", stream=stream, logger_formatter=TextFormatter(service="t-exc"))
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("batch failed", extra={"job_id": "j1"})
    first, *rest = stream.getvalue().rstrip("\n").split("\n")
    assert first.endswith("batch failed  job_id=j1")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ZeroDivisionError: division by zero"


@pytest.fixture
def restore_worker_logger(monkeypatch):
    monkeypatch.delenv("POWERTOOLS_METRICS_DISABLED", raising=False)
    yield
    configure_logging("json")


def test_configure_switches_the_worker_logger_and_back(restore_worker_logger, monkeypatch):
    assert configure_logging("text") == "text"
    assert isinstance(worker_logger.registered_handler.formatter, TextFormatter)
    import os

    assert os.environ["POWERTOOLS_METRICS_DISABLED"] == "true"  # no EMF blobs between readable lines
    assert configure_logging("json") == "json"
    formatter = worker_logger.registered_handler.formatter
    assert isinstance(formatter, LambdaPowertoolsFormatter) and not isinstance(formatter, TextFormatter)
    record = worker_logger._logger.makeRecord("x", 20, __file__, 1, "hello", (), None)
    assert json.loads(formatter.format(record))["message"] == "hello"


def test_the_cli_option_and_its_environment_variable(restore_worker_logger, monkeypatch, tmp_path):
    from worker.cli import main

    (tmp_path / "m.json").write_text('{"items": []}')
    args = ["export", str(tmp_path / "m.json"), "--out", str(tmp_path / "x.csv")]
    assert CliRunner().invoke(main, ["--log-format", "text", *args]).exit_code == 0
    assert isinstance(worker_logger.registered_handler.formatter, TextFormatter)
    assert CliRunner().invoke(main, args).exit_code == 0  # auto, and the runner's output is no terminal
    assert not isinstance(worker_logger.registered_handler.formatter, TextFormatter)
    monkeypatch.setenv("DOGBREEDS_LOG_FORMAT", "text")
    assert CliRunner().invoke(main, args).exit_code == 0
    assert isinstance(worker_logger.registered_handler.formatter, TextFormatter)
    result = CliRunner().invoke(main, ["--log-format", "xml", *args])
    assert result.exit_code == 2 and "xml" in result.output

"""Settings come from one mechanism: WorkerSettings validates every DOGBREEDS_* value the same
way for the Lambda handler (from_env, per invocation) and for the CLI (its options are made from
the same fields, click reading the same variables): a bad value is one error that names the
variable, and the environment is never read at import or by --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import click
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from worker.settings import ENV, SettingsError, WorkerSettings, env_int, env_name

ROOT = Path(__file__).resolve().parents[2]
NUMERIC = ["batch_size", "download_threads", "top_k", "decode_budget_pixels", "lambda_safety_ms",
           "prefix_page_keys", "max_prefix_keys", "min_score"]
#: the numeric settings each command takes as an option (the others are Lambda-only)
CLI_NUMERIC = {"classify": ["batch_size", "download_threads", "top_k", "decode_budget_pixels", "min_score"],
               "run": ["batch_size", "download_threads", "top_k", "decode_budget_pixels", "min_score",
                       "prefix_page_keys", "max_prefix_keys"],
               "predict": ["decode_budget_pixels", "min_score"]}
ARGS = {"classify": ["--model", "m", "src"], "run": ["--model", "m", "--queue-url", "q"],
        "predict": ["--model", "m", "photo.jpg"]}
values = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True).map(str),
                   st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
                   st.sampled_from(["abc", "1e3", " 7 ", "0x10", "16.5", "-1", "0", "∞"]))


def cli_value(command: str, field: str, value: str):
    """What the CLI's `command` makes of DOGBREEDS_<FIELD>=value (parsing only: nothing runs)."""
    from worker.cli import main

    with mock.patch.dict(os.environ, {env_name(field): value}):
        try:
            with main.commands[command].make_context(command, list(ARGS[command])) as ctx:
                return ctx.params[field]
        except click.BadParameter as error:
            return error


@given(field=st.sampled_from(NUMERIC), value=values)
def test_a_numeric_variable_is_valid_or_one_error_naming_it_in_the_handler_and_the_cli_alike(field, value):
    variable = env_name(field)
    try:
        settings = WorkerSettings.from_env({variable: value})
    except SettingsError as error:
        message = str(error)
        assert message.startswith(f"{variable}={value!r} is not valid: ") and "\n" not in message
        accepted = None
    else:
        accepted = getattr(settings, field)
        if value.strip():
            assert isinstance(accepted, (int, float)) and not isinstance(accepted, bool)
            if field == "min_score":
                assert 0.0 <= accepted <= 1.0
            else:
                assert accepted >= (0 if field == "lambda_safety_ms" else 1)
                assert accepted == int(value.strip()) if value.strip().lstrip("-").isdigit() else True
        else:  # empty: unset
            assert accepted == WorkerSettings.model_fields[field].default
    for command, fields in CLI_NUMERIC.items():
        if field in fields and value.strip():
            got = cli_value(command, field, value)
            if accepted is None:
                assert isinstance(got, click.BadParameter) and f"environment variable {variable}=" in got.message
            else:
                assert got == accepted


@pytest.mark.parametrize("command", sorted(CLI_NUMERIC))
def test_a_bad_variable_stops_the_command_with_one_line_naming_it_and_help_still_works(command):
    from worker.cli import main

    for field in CLI_NUMERIC[command]:
        variable = env_name(field)
        result = CliRunner().invoke(main, [command, *ARGS[command]], env={variable: "abc"})
        assert result.exit_code == 2, result.output  # a usage error: no model was loaded, nothing ran
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and f"{variable}='abc'" in errors[0], result.output
        helped = CliRunner().invoke(main, [command, "--help"], env={variable: "abc"})
        assert helped.exit_code == 0 and variable in helped.output, helped.output


def test_nothing_reads_the_environment_at_import_or_for_help():
    bad = {**os.environ, **{env_name(f): "abc" for f in NUMERIC}, "DOGBREEDS_JSONL": "maybe",
           "DOGBREEDS_DOG_CHECK": "perhaps", "DOGBREEDS_THREADS": "many", "PYTHONPATH": str(ROOT)}
    code = "import worker.handler, worker.poller, worker.cli, trainer.cli; print('imported')"
    imported = subprocess.run([sys.executable, "-c", code], env=bad, capture_output=True, text=True, cwd=ROOT)
    assert imported.returncode == 0 and "imported" in imported.stdout, imported.stderr
    for args in (["--help"], ["run", "--help"], ["classify", "--help"], ["predict", "--help"]):
        shown = subprocess.run([sys.executable, "-m", "worker.cli", *args], env=bad, capture_output=True, text=True,
                               cwd=ROOT)
        assert shown.returncode == 0 and "Usage:" in shown.stdout, shown.stderr


def test_the_handler_reads_its_settings_when_invoked_and_names_a_bad_variable(monkeypatch):
    from tests.unit.test_handler import LambdaContext
    from worker import handler

    monkeypatch.setattr(handler, "_pipeline", object())  # never reached: the settings fail first
    monkeypatch.setenv("DOGBREEDS_BATCH_SIZE", "sixteen")
    with pytest.raises(SettingsError) as raised:
        handler.lambda_handler({"Records": []}, LambdaContext())
    assert str(raised.value).startswith("DOGBREEDS_BATCH_SIZE='sixteen' is not valid:")
    assert "\n" not in str(raised.value)


def test_manifest_format_from_the_new_variable_the_legacy_one_and_the_flag():
    assert WorkerSettings.from_env({}).manifest_format == "json"
    assert WorkerSettings.from_env({"DOGBREEDS_JSONL": "1"}).jsonl
    assert not WorkerSettings.from_env({"DOGBREEDS_JSONL": "0"}).jsonl
    assert not WorkerSettings.from_env({"DOGBREEDS_MANIFEST_FORMAT": "json", "DOGBREEDS_JSONL": "1"}).jsonl
    with pytest.raises(SettingsError, match="DOGBREEDS_JSONL='maybe'"):
        WorkerSettings.from_env({"DOGBREEDS_JSONL": "maybe"})
    assert cli_value("classify", "manifest_format", "jsonl") == "jsonl"
    with mock.patch.dict(os.environ, {"DOGBREEDS_JSONL": "1"}):
        from worker.cli import main

        with main.commands["classify"].make_context("classify", list(ARGS["classify"])) as ctx:
            assert ctx.params["manifest_format"] == "jsonl"
        with main.commands["classify"].make_context("classify", [*ARGS["classify"], "--manifest-format",
                                                                 "json"]) as ctx:
            assert ctx.params["manifest_format"] == "json"  # the flag wins


def test_the_manifest_format_flag_does_not_clash_with_predicts_json():
    from worker.cli import main

    spelled = {command: {opt for p in main.commands[command].params for opt in (*p.opts, *p.secondary_opts)}
               for command in ("run", "classify", "predict")}
    assert "--json" in spelled["predict"] and "--json" not in spelled["run"] | spelled["classify"]
    assert "--manifest-format" in spelled["run"] & spelled["classify"]


@pytest.mark.parametrize("cli", ["worker.cli", "trainer.cli"])
def test_every_option_of_every_command_has_help(cli):
    import importlib

    group = importlib.import_module(cli).main
    missing = [f"{name} {param.opts[0]}" for name, command in group.commands.items() for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    assert not missing
    assert all(len(command.params) for command in group.commands.values())


def test_the_variables_listed_are_the_settings_fields_and_the_ones_read_elsewhere():
    assert {env_name(f) for f in WorkerSettings.model_fields} <= set(ENV)
    assert all(description for description in ENV.values())


@given(raw=st.text(max_size=8))
def test_env_int_is_an_int_or_an_error_naming_the_variable(raw):
    try:
        value = env_int("DOGBREEDS_THREADS", 3, minimum=1, env={"DOGBREEDS_THREADS": raw})
    except SettingsError as error:
        assert str(error).startswith("DOGBREEDS_THREADS=") and "\n" not in str(error)
    else:
        assert value == (int(raw.strip()) if raw.strip() else 3) and value >= 1

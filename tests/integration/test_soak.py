"""A CI-sized soak (``benchmarks/soak.py``): 200 photos as S3 event messages through moto's server (a
child process) and the real worker command, SIGKILLed twice mid-batch and restarted; nothing lost, nothing
duplicated, every entry what was planted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_200_messages_with_two_kills_loses_and_duplicates_nothing(aws_env, colour_artifact):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--messages", "200", "--kills", "2", "--seed", "7",
         "--json", "--model", str(colour_artifact), "--timeout", "150"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert {"sent", "manifests", "ok", "error", "lost", "duplicated", "kills"} <= set(result)
    assert result["lost"] == 0 and result["duplicated"] == 0, (result, completed.stderr[-3000:])
    assert result["kills"] == 2 and result["kills_in_flight"] == 2, result
    assert result["sent"] == 200 and result["manifests"] == 200, result
    assert (result["ok"], result["error"]) == (180, 20), result  # 10% bad photos, each one typed error
    assert result["mismatched"] == 0 and result["dlq"] == 0 and result["unexpected_exits"] == 0, result
    assert completed.returncode == 0, completed.stderr[-3000:]

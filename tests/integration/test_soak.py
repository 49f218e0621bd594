"""A CI-sized soak (``benchmarks/soak.py``): 200 photos as S3 event messages, each delivered twice, 8 job
messages overlapping them, 5% worst-case photos, through moto's server (a child process) behind the fault
proxy and the real worker command, SIGKILLed twice and restarted; nothing lost, nothing duplicated, every
manifest lists exactly its message's photos, each with the label it gets classified alone. (Kill moments
are timing-dependent; in trial runs, seed 7's caught a deliberately broken worker whose S3-event job ids
were not deterministic: duplicated > 0.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_soak_200_messages_with_two_kills_loses_and_duplicates_nothing(aws_env, colour_artifact):
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--messages", "200", "--kills", "2", "--seed", "7",
         "--json", "--model", str(colour_artifact), "--timeout", "330"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=450)
    except subprocess.TimeoutExpired:
        process.terminate()  # the soak stops its worker and moto's server on SIGTERM
        try:
            stdout, stderr = process.communicate(timeout=30)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only what the soak started
            except ProcessLookupError:
                pass
        pytest.fail(f"the soak ran over 450 s:\n{stderr[-3000:]}")
    completed = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output (exit {completed.returncode}):\n{completed.stderr[-3000:]}"
    result = json.loads(lines[-1])
    assert {"sent", "manifests", "ok", "error", "lost", "duplicated", "wrong_key", "wrong_label", "kills"} <= set(result)
    assert result["lost"] == 0 and result["duplicated"] == 0, (result, completed.stderr[-3000:])
    assert result["wrong_key"] == 0 and result["wrong_label"] == 0, (result, completed.stderr[-3000:])
    assert result["kills"] == 2 and result["kills_in_flight"] >= 1, result  # the kills interrupted work
    # 200 events sent twice, 8 jobs (the 5th twice); one manifest per event (its copy rewrites it) and job
    assert (result["sent"], result["events"], result["jobs"]) == (409, 200, 8), result
    assert result["manifests"] == result["expected_manifests"] == 208, result
    assert result["worst_case"] == 10 and sum(result["faults"].values()) > 0, result
    assert result["mismatched"] == 0 and result["dlq"] == 0 and result["unexpected_exits"] == 0, result
    assert completed.returncode == 0, completed.stderr[-3000:]

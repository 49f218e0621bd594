#!/usr/bin/env bash
# Static and smoke checks of the deployment files, offline:
#   cfn-lint infra/template.yaml infra/poller-service.yaml
#   sam validate --lint -t infra/template.yaml
#   hadolint infra/Dockerfile
#   pytest tests/unit/test_iam_policy.py tests/integration/test_infra.py tests/integration/test_poller_service.py
#     (the SAM template translated with samtranslator and deployed into moto's CloudFormation; the
#     Fargate poller service read, deployed into moto and its container command run against moto)
#
# The tools live in their own virtual environment, .venv-tools (aws-sam-cli pins its own boto3
# and aws-sam-translator); it is made here from infra/requirements-tools.txt when missing or
# older than that file. `infra/check.sh venv` only makes it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TOOLS=${DOGBREEDS_TOOLS_VENV:-.venv-tools}
REQUIREMENTS=infra/requirements-tools.txt
STAMP=$TOOLS/.installed

# No usage telemetry from sam; everything below works offline.
export SAM_CLI_TELEMETRY=0
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}

log() { printf '== %s\n' "$*" >&2; }

tools_venv() {
    if [[ -f $STAMP && ! $REQUIREMENTS -nt $STAMP && -x $TOOLS/bin/sam ]]; then
        return
    fi
    log "making $TOOLS from $REQUIREMENTS"
    [[ -x $TOOLS/bin/python ]] || "$PYTHON" -m venv "$TOOLS"
    # (pip's 'Location ... is ignored' lines come from this machine's extra local indexes)
    "$TOOLS/bin/pip" install --disable-pip-version-check -q -r "$REQUIREMENTS" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$STAMP"
}

timed() {
    local name=$1 start
    shift
    log "$name"
    start=$(date +%s%N)
    "$@"
    local ms=$((($(date +%s%N) - start) / 1000000))
    printf '   %s: ok in %d.%03d s\n' "$name" $((ms / 1000)) $((ms % 1000)) >&2
}

tools_venv
[[ ${1:-all} == venv ]] && exit 0

timed "cfn-lint" "$TOOLS/bin/cfn-lint" infra/template.yaml infra/poller-service.yaml
timed "sam validate --lint" "$TOOLS/bin/sam" validate --lint -t infra/template.yaml
timed "hadolint" "$TOOLS/bin/hadolint" infra/Dockerfile

if [[ ! -x .venv/bin/python ]]; then
    log "no project .venv: run 'make install' first for the smoke tests"
    exit 1
fi
# Only these tests; they translate with the project venv's samtranslator if it has one, else
# with $TOOLS in a subprocess (DOGBREEDS_TOOLS_VENV tells them where).
DOGBREEDS_TOOLS_VENV=$(cd "$TOOLS" && pwd) timed "smoke deployment (pytest)" \
    .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/test_iam_policy.py tests/integration/test_infra.py \
    tests/integration/test_poller_service.py

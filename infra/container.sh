#!/usr/bin/env bash
# The worker's container image (infra/Dockerfile), built and tested here without a Docker engine:
#
#   infra/container.sh build   two images of infra/Dockerfile: the full worker (TensorFlow +
#                              OpenVINO, serves every artifact) and the slim one (WORKER_EXTRAS=
#                              worker-lite: OpenVINO only, no TensorFlow); their sizes are logged.
#                              podman/buildah/runc/debootstrap from apt when missing; a Debian
#                              bookworm rootfs (debootstrap minbase + python3) imported as the base
#                              image, and the wheels of the project's dependencies downloaded on
#                              the host (both cached under .cache/container/); then the image,
#                              built with no network (pip reads the wheels from a build volume)
#   infra/container.sh test    tests/integration/test_container.py against each image: the Lambda
#                              entry point under the real Runtime Interface Emulator (from the
#                              aws-sam-cli wheel, .venv-tools) fed with SQS events by a small event
#                              source mapping, and the poller entry point; both on a moto server
#                              (the slim image is given a model published with OpenVINO variants)
#   infra/container.sh clean   remove the images and .cache/container (the next build is cold)
#
# Settings: DOGBREEDS_CONTAINER_IMAGE (default localhost/dogbreeds-worker:latest),
# DOGBREEDS_CONTAINER_LITE_IMAGE (default localhost/dogbreeds-worker-lite:latest),
# DOGBREEDS_CONTAINER_CACHE (default .cache/container), DEBIAN_MIRROR, PYTHON.
# podman runs with a containers.conf of its own (runc, explicit ulimits, cgroupfs, file events)
# through CONTAINERS_CONF; the machine's configuration is not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${DOGBREEDS_CONTAINER_CACHE:-$ROOT/.cache/container}
IMAGE=${DOGBREEDS_CONTAINER_IMAGE:-localhost/dogbreeds-worker:latest}
LITE_IMAGE=${DOGBREEDS_CONTAINER_LITE_IMAGE:-localhost/dogbreeds-worker-lite:latest}
BASE_IMAGE=localhost/dogbreeds-base:bookworm
SUITE=bookworm
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-python3}
AWSLAMBDARIC=$(grep -o 'awslambdaric==[0-9.]*' infra/Dockerfile | head -1)

log() { printf '== %s\n' "$*" >&2; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
seconds_since() { local ms=$(($(now_ms) - $1)); printf '%d.%01d s' $((ms / 1000)) $((ms % 1000 / 100)); }

mkdir -p "$CACHE"
# Explicit ulimits: podman's defaults for root (nofile 1048576, nproc 4194304) are above the
# hard limits here, and root without CAP_SYS_RESOURCE cannot raise them (runc: "error setting
# rlimit type 6 [nproc] / 7 [nofile]: operation not permitted"). Podman 4.3 also ran itself (and
# conmon) with nproc 32768 here, below the shell's hard limit, so no more than that either.
NOFILE=$(ulimit -Hn)
NPROC=$(ulimit -Hu)
[[ $NOFILE != unlimited ]] && ((NOFILE <= 20000)) || NOFILE=20000
[[ $NPROC != unlimited ]] && ((NPROC <= 32768)) || NPROC=32768
export CONTAINERS_CONF=$CACHE/containers.conf
cat > "$CONTAINERS_CONF" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

need_packages() {
    local missing=()
    command -v podman > /dev/null || missing+=(podman)
    command -v buildah > /dev/null || missing+=(buildah)
    command -v runc > /dev/null || missing+=(runc)
    command -v debootstrap > /dev/null || missing+=(debootstrap)
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}" containernetworking-plugins ca-certificates
    fi
}

base_image() {
    if podman image exists "$BASE_IMAGE"; then
        return
    fi
    local tarball=$CACHE/$SUITE-rootfs.tar
    if [[ ! -f $tarball ]]; then
        local started rootfs=$CACHE/$SUITE-rootfs
        started=$(now_ms)
        log "debootstrap $SUITE (minbase + python3) from $DEBIAN_MIRROR"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" \
            "$DEBIAN_MIRROR" > "$CACHE/debootstrap.log" 2>&1 || {
            tail -30 "$CACHE/debootstrap.log" >&2
            exit 1
        }
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*
        tar --numeric-owner -C "$rootfs" -cf "$tarball.partial" .
        mv "$tarball.partial" "$tarball"
        rm -rf "$rootfs"
        log "rootfs in $(seconds_since "$started")"
    fi
    podman import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" > /dev/null
}

wheels() {
    # the wheels of everything the image installs; refreshed when pyproject.toml or the
    # Dockerfile changes (the image build itself has no network)
    local dir=$CACHE/wheels stamp=$CACHE/wheels/.complete
    if [[ -f $stamp && ! pyproject.toml -nt $stamp && ! infra/Dockerfile -nt $stamp ]]; then
        return
    fi
    local started
    started=$(now_ms)
    log "pip wheel: the worker's dependencies (both images), $AWSLAMBDARIC, setuptools, wheel -> $dir"
    mkdir -p "$dir"
    "$PYTHON" -m pip wheel --disable-pip-version-check -q --prefer-binary --wheel-dir "$dir" \
        ".[worker-tf,worker-lite]" "$AWSLAMBDARIC" "setuptools>=68" wheel \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    rm -f "$dir"/dogbreeds-*.whl  # the image builds the project from its sources
    touch "$stamp"
    log "wheels in $(seconds_since "$started")"
}

context() {
    # only what the image needs (the repository root holds virtual environments and caches)
    local dir=$CACHE/context
    rm -rf "$dir"
    mkdir -p "$dir"
    cp pyproject.toml "$dir/"
    [[ ! -f README.md ]] || cp README.md "$dir/"
    tar --exclude=__pycache__ --exclude='*.pyc' -cf - worker trainer | tar -C "$dir" -xf -
    printf '[global]\nno-index = true\nfind-links = /wheels\n' > "$CACHE/pip.conf"
}

build_image() {  # build_image TAG WORKER_EXTRAS
    local started size
    started=$(now_ms)
    log "podman build $1 (WORKER_EXTRAS=$2, BASE_IMAGE=$BASE_IMAGE, no network)"
    podman build --pull=never --network=none \
        --volume "$CACHE/wheels:/wheels:ro" --volume "$CACHE/pip.conf:/etc/pip.conf:ro" \
        --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "WORKER_EXTRAS=$2" \
        -f "$ROOT/infra/Dockerfile" -t "$1" "$CACHE/context"
    size=$(podman image inspect --format '{{.Size}}' "$1")
    log "built $1: $((size / 1000000)) MB in $(seconds_since "$started")"
}

build() {
    local started
    started=$(now_ms)
    need_packages
    base_image
    wheels
    context
    build_image "$IMAGE" worker-tf,worker-lite
    build_image "$LITE_IMAGE" worker-lite
    log "both images in $(seconds_since "$started")"
}

test_image() {
    local started
    started=$(now_ms)
    need_packages
    local image
    for image in "$IMAGE" "$LITE_IMAGE"; do
        podman image exists "$image" || {
            log "no image $image: run 'infra/container.sh build' first"
            exit 1
        }
    done
    [[ -x .venv/bin/python ]] || make install
    infra/check.sh venv
    local rie
    rie=$(.venv-tools/bin/python -c \
        'import pathlib, samcli; print(pathlib.Path(samcli.__file__).parent / "local/rapid/aws-lambda-rie-x86_64")')
    export DOGBREEDS_CONTAINER_ENGINE=podman DOGBREEDS_LAMBDA_RIE=$rie
    local flavour
    for flavour in full lite; do
        if [[ $flavour == full ]]; then image=$IMAGE; else image=$LITE_IMAGE; fi
        export DOGBREEDS_CONTAINER_IMAGE=$image DOGBREEDS_CONTAINER_FLAVOUR=$flavour
        export DOGBREEDS_CONTAINER_TIMINGS=$CACHE/timings-$flavour.json
        rm -f "$DOGBREEDS_CONTAINER_TIMINGS"
        log "test $image ($flavour)"
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_container.py "$@"
        [[ ! -f $DOGBREEDS_CONTAINER_TIMINGS ]] || log "timings ($flavour): $(cat "$DOGBREEDS_CONTAINER_TIMINGS")"
    done
    log "container tests in $(seconds_since "$started")"
}

clean() {
    if command -v podman > /dev/null; then
        podman rmi -f "$IMAGE" "$LITE_IMAGE" "$BASE_IMAGE" 2> /dev/null || true
        podman image prune -f > /dev/null || true
    fi
    rm -rf "$CACHE"
}

case ${1:-} in
    build) build ;;
    test) shift; test_image "$@" ;;
    clean) clean ;;
    *)
        echo "usage: $0 build|test [pytest args]|clean" >&2
        exit 2
        ;;
esac

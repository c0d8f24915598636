#!/usr/bin/env bash
# One entry point for a fresh machine: sets up ./.venv on first use, then runs a job.
#   ./timeviper.sh ask [options]   answer a question about a video (no options: tiny random model, sample video)
#   ./timeviper.sh test [pytest args]   run the test suite (from the repository: test paths are relative to it)
#   ./timeviper.sh python ...      run Python inside the environment
# `ask` and `python` run in the caller's directory, so relative --video / --model / script paths mean what they say.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

VENV=${TIMEVIPER_VENV:-$repo/.venv}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PYTHON=${PYTHON:-python3}
stamp="$VENV/.timeviper-installed"
want=$(cat "$repo/setup.cfg" "$repo/pyproject.toml" "$repo/timeviper.sh" | sha1sum | cut -d' ' -f1)

installed() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }

install() (
    cd "$repo"
    echo "[timeviper] setting up $VENV (first run only) ..." >&2
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    # torch + torchvision first, pinned to the builds this machine image carries (timm, the vision oracle of the
    # tests, needs torchvision); unpinned, pip would resolve a multi-GB download as a dependency.
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" >&2 \
        || "$VENV/bin/python" -m pip install -q "torch>=2.5" torchvision >&2
    "$VENV/bin/python" -m pip install -q -e ".[test,video,train]" >&2
    # DeepSpeed for ZeRO-3 training (training/accelerate_configs; its tests run on DeepSpeed's CPU accelerator). It
    # ships as an sdist whose setup imports torch: built against the torch above, not in an isolated build env that
    # would download another one.
    "$VENV/bin/python" -m pip install -q setuptools wheel >&2
    "$VENV/bin/python" -m pip install -q --no-build-isolation "deepspeed==0.19.8" >&2
    echo "$want" > "$stamp"
)

if ! installed; then
    # Two first runs at once would install into the same environment together: the second waits for the first's
    # lock (released by the kernel even if the first is killed), then finds the stamp and installs nothing.
    mkdir -p "$VENV"
    exec 9>"$VENV/.timeviper-install.lock"
    if command -v flock >/dev/null; then
        flock 9
    else
        echo "[timeviper] warning: no flock command; do not start a second run until this one has set up $VENV" >&2
    fi
    if ! installed; then
        install
    fi
    exec 9>&-
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the packages inference/, training/, ... of this checkout
job=${1:-ask}
shift || true
case "$job" in
    ask) exec "$VENV/bin/python" -m inference.ask "$@" ;;
    test) cd "$repo" && exec "$VENV/bin/python" -m pytest -q "$@" ;;
    python) exec "$VENV/bin/python" "$@" ;;
    *) echo "usage: $0 {ask|test|python} [args...]" >&2; exit 2 ;;
esac

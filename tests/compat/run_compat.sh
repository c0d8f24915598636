#!/usr/bin/env bash
# The remote-code compatibility job: the oldest, one middle and the newest transformers release of the supported
# range (configuration_timeviper.SUPPORTED_TRANSFORMERS, setup.cfg). Each runs in a side venv that installs only
# that transformers and reuses everything else (torch, av, ...) from the main venv through a .pth file, in a fresh
# process, from a temporary folder, with the package not importable: check_remote_code.py on a folder written by
# the package (write_folder.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
VENV=${TIMEVIPER_VENV:-.venv}
VERSIONS=${TIMEVIPER_COMPAT_VERSIONS:-"5.13.0 5.20.2 5.25.0"}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" tests/compat/write_folder.py "$work/folder"
main_site=$(cd "$(purelib "$VENV")" && pwd -P)
for version in $VERSIONS; do
    echo "[compat] transformers $version" >&2
    side="$work/venv-$version"
    "$VENV/bin/python" -m venv --without-pip "$side"
    echo "$main_site" > "$(purelib "$side")/main-venv.pth"
    # pip comes from the main venv; it installs into the side venv (its sys.prefix).
    "$side/bin/python" -m pip install -q --disable-pip-version-check "transformers==$version" >&2
    (cd "$work" && env -u PYTHONPATH HF_HOME="$work/hf-$version" "$side/bin/python" "$repo/tests/compat/check_remote_code.py" "$work/folder")
done

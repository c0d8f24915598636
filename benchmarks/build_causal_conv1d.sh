#!/usr/bin/env bash
# Build the causal-conv1d CUDA extension into a wheel on the GPU machine (it has nvcc; the registry has no binary
# wheel), for H100/H200 only (sm_90: the other architectures would multiply the build time), against that machine's
# torch. The wheel comes back through $OUT in pieces of at most 15 MB (the largest file the device tool returns);
# join them here into the git-ignored wheels/ folder, which later calls carry and benchmarks/gpu_setup.sh installs:
#     cat causal_conv1d-*.whl.part-* > wheels/causal_conv1d-<tags>.whl
# Usage (repo root, wheels/causal_conv1d-1.7.0.tar.gz carried):  bash benchmarks/build_causal_conv1d.sh "$OUT"
set -euo pipefail
out=${1:?usage: build_causal_conv1d.sh OUTPUT_FOLDER}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
tar xzf "$repo"/wheels/causal_conv1d-*.tar.gz -C "$work"
src=$(ls -d "$work"/causal_conv1d-*/)
# Only sm_90, and no -lineinfo (debug line tables would make the wheel larger for nothing at run time).
python3 - "$src/setup.py" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text = text.replace("    # HACK: The compiler flag", "    cc_flag = [\"-gencode\", \"arch=compute_90,code=sm_90\"]\n    # HACK: The compiler flag", 1)
text = text.replace('"-lineinfo",', "")
open(path, "w").write(text)
PY
started=$(date +%s)
(cd "$src" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-12} python3 -m pip wheel --no-build-isolation --no-deps -w "$work/dist" . ) \
    > "$out/causal_conv1d_build.log" 2>&1
wheel=$(ls "$work"/dist/causal_conv1d-*.whl)
echo "built $(basename "$wheel") ($(stat -c %s "$wheel") bytes) in $(( $(date +%s) - started )) s" | tee -a "$out/causal_conv1d_build.log"
split -b 15M -d "$wheel" "$out/$(basename "$wheel").part-"

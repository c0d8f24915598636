#!/usr/bin/env bash
# Prepare the GPU machine of the `device` tool for benchmarks/long_video.py and benchmarks/multi_gpu/run.sh. Source it
# from the repo root:
#     source benchmarks/gpu_setup.sh
# Idempotent. Needs the carried folder wheels/ (git-ignored) holding mamba_ssm-2.3.2.post1.tar.gz and, for the training
# benchmark, the wheels of step 4. Nothing is downloaded: that machine reaches no registry.
#  1. `timeviper` importable: /tmp/timeviper_site/timeviper -> the repo root (the repo root is the package).
#  2. mamba-ssm installed from its sdist as pure Python (MAMBA_FORCE_BUILD=TRUE skips the prebuilt-wheel download,
#     MAMBA_SKIP_CUDA_BUILD=TRUE skips nvcc): its Mamba-2 ops (mamba_chunk_scan_combined, selective_state_update)
#     are Triton kernels and need no compilation.
#  3. a stub `selective_scan_cuda` module, because mamba_ssm/__init__ imports the Mamba-1 CUDA extension
#     unconditionally; the stub raises on any use (Nemotron-H never uses the Mamba-1 scan).
#  4. every carried wheel (wheels/*.whl) whose distribution is not installed, with --no-deps, so the image's own
#     versions stay: PyAV (training decodes videos with it), and DeepSpeed with its runtime dependencies
#     (hjson, msgpack, ninja, py-cpuinfo, einops, psutil, pydantic + pydantic_core, annotated-types,
#     typing-inspection). The DeepSpeed wheel is pure Python, built here with DS_BUILD_OPS=0 (benchmarks/multi_gpu/
#     README.md): its C++/CUDA ops would compile on first use, and ZeRO-3 with the Trainer's torch optimizer uses none.
# causal-conv1d has no binary wheel on the registry: benchmarks/build_causal_conv1d.sh builds one there once (about
# 5 minutes of nvcc); carried as wheels/causal_conv1d-*.whl it is installed by step 4, and the model's Mamba-2 conv
# runs through its kernel. Without it the conv runs through torch.nn.functional.conv1d.
_TV_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_TV_SITE=/tmp/timeviper_site
mkdir -p "$_TV_SITE"
[ -e "$_TV_SITE/timeviper" ] || ln -s "$_TV_REPO" "$_TV_SITE/timeviper"
cat > "$_TV_SITE/selective_scan_cuda.py" <<'PY'
"""Stub: the Mamba-1 CUDA scan of mamba-ssm was not built (only its Triton Mamba-2 kernels are used)."""


def __getattr__(name):
    raise ImportError("Mamba-1 CUDA scan not built (selective_scan_cuda stub from benchmarks/gpu_setup.sh)")
PY
case ":${PYTHONPATH:-}:" in *":$_TV_SITE:"*) ;; *) export PYTHONPATH="$_TV_SITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
if ! python3 -c "import mamba_ssm" >/dev/null 2>&1; then
    _TV_SDIST="$(ls "$_TV_REPO"/wheels/mamba_ssm-*.tar.gz 2>/dev/null | head -1)"
    if [ -n "$_TV_SDIST" ]; then
        tar xzf "$_TV_SDIST" -C /tmp
        _TV_SRC="$(ls -d /tmp/mamba_ssm-*/ | head -1)"
        MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE python3 -m pip install -q --no-index --no-deps \
            --no-build-isolation "$_TV_SRC" >/tmp/mamba_ssm_install.log 2>&1 \
            || { echo "gpu_setup: pip install of mamba_ssm failed (see /tmp/mamba_ssm_install.log); using the source tree"; \
                 export PYTHONPATH="${_TV_SRC%/}:$PYTHONPATH"; }
    else
        echo "gpu_setup: no wheels/mamba_ssm-*.tar.gz carried: the model will use its PyTorch Mamba-2 path"
    fi
fi
_TV_MISSING=()
for _TV_WHEEL in "$_TV_REPO"/wheels/*.whl; do
    [ -e "$_TV_WHEEL" ] || continue
    # The distribution name is the file name up to the first '-' (importlib.metadata normalises '_' and case).
    _TV_NAME="$(basename "$_TV_WHEEL")"
    python3 -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "${_TV_NAME%%-*}" >/dev/null 2>&1 \
        || _TV_MISSING+=("$_TV_WHEEL")
done
if [ ${#_TV_MISSING[@]} -gt 0 ]; then
    echo "gpu_setup: installing ${#_TV_MISSING[@]} carried wheel(s): ${_TV_MISSING[*]##*/}"
    python3 -m pip install -q --no-index --no-deps "${_TV_MISSING[@]}" \
        || echo "gpu_setup: pip install of the carried wheels failed"
fi
python3 - <<'PY'
import importlib
for name in ("torch", "triton", "transformers", "accelerate", "mamba_ssm", "causal_conv1d", "av", "deepspeed"):
    try:
        print(f"gpu_setup: {name} {importlib.import_module(name).__version__}")
    except Exception as err:  # noqa: BLE001
        print(f"gpu_setup: {name} NOT importable: {type(err).__name__}: {err}")
import timeviper.modeling_timeviper as tm
print("gpu_setup: kernels: mamba_chunk_scan_combined", tm.mamba_chunk_scan_combined is not None,
      "selective_state_update", tm.selective_state_update is not None, "causal_conv1d", tm.causal_conv1d_fn is not None)
PY

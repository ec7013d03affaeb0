#!/usr/bin/env bash
# CPU rehearsal of a GPU session under the GPU image's versions, and what to carry to the GPU machine.
#
#   bash benchmarks/gpu_rehearsal.sh            # venv + wheels + prebuilt extension + rehearsal run
#   SKIP_RUN=1 bash benchmarks/gpu_rehearsal.sh # only prepare what the GPU call carries
#
# 1. A Python 3.12 venv (REHEARSAL_VENV, default /tmp/v312) with the image's torch 2.11.0 (+cu130, it imports
#    without a GPU), triton 3.6.0, transformers 5.17.0, and numpy<2.4: triton 3.6's interpreter fails with
#    numpy >= 2.4 (the image has numpy 2.5, harmless there: GPU runs do not interpret).
# 2. The peer wheels (no index on the GPU machine) in .whl/ (git-ignored; carried with carry=[".whl"]).
# 3. deberta_fast/_C.cpython-312-*.so built against that torch with this machine's nvcc 13.0 (the image's
#    CUDA) for sm_90a (~5 min on 2 cores): carrying it saves the GPU machine the build; the session's build
#    stage keeps it when it loads there and builds otherwise.
# 4. `python -m benchmarks.gpu_session --rehearse`: every stage at CPU sizes (Triton interpreter).
# Then, on a lent GPU (device tool), one call:
#   run(command="python3 -m benchmarks.gpu_session --budget 540", carry=[".whl",
#       "deberta_fast/_C.cpython-312-x86_64-linux-gnu.so"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${REHEARSAL_VENV:-/tmp/v312}
PY312=${PY312:-$(command -v python3.12 || echo "$HOME/.pyenv/versions/3.12.1/bin/python")}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY312" -m venv "$VENV"
fi
# torch 2.11's own pins, then cudnn on its own (its wheel is manylinux_2_27 only)
"$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4" pytest pytest-benchmark \
  hypothesis matplotlib einops ninja pybind11 "setuptools<82"
"$VENV/bin/python" -c "import torch, triton, transformers, numpy; print('rehearsal venv: torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl disentangled-flash flashdeberta   # their other needs (einops, triton, transformers) are in the image

# (re)built when missing or older than any source under csrc/ (a stale one would run old kernels)
SO=$(compgen -G "deberta_fast/_C.cpython-312-*.so" | head -n 1 || true)
if [ -z "$SO" ] || [ -n "$(find csrc -type f -newer "$SO" | head -n 1)" ]; then
  rm -f deberta_fast/_C.cpython-312-*.so
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} DEBERTA_FAST_BUILD_CUDA=1 DEBERTA_FAST_CUDA_ARCHS=${ARCHS:-90a} \
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace
fi
"$VENV/bin/python" -c "import deberta_fast._C; print('prebuilt extension imports:', deberta_fast._C.__file__)"

if [ "${SKIP_RUN:-0}" != "1" ]; then
  "$VENV/bin/python" -m benchmarks.gpu_session --rehearse --budget "${BUDGET:-1500}" --out "${OUT_DIR:-/tmp/gpu-rehearsal}"
fi

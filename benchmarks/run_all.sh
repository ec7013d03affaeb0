#!/usr/bin/env bash
# The one script for any machine (CPU or GPU, online or offline):
#   install/build deberta_fast -> run the tests -> run the benchmarks (auto profile) -> write the report.
#
#   bash benchmarks/run_all.sh                  # everything, profile chosen by device
#   PROFILE=quick bash benchmarks/run_all.sh    # force a profile (quick | full | auto)
#   RUN_TESTS=0 bash benchmarks/run_all.sh      # skip the test suite
#   BENCH_ARGS="-k core" bash benchmarks/run_all.sh   # extra pytest arguments for the benchmarks
#
# Offline machines: put wheels in .whl/ (peer libraries disentangled-flash, flashdeberta and their
# einops dependency, matplotlib ...); they are installed with --no-index --no-deps.
# Results: benchmarks/results/<date>-<device>-<profile>/{results.json,env.json,table.md,*.png}, written by
# `pytest benchmarks/` itself at the end of the session (benchmarks/conftest.py; BENCH_JSON=path keeps a copy).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PROFILE=${PROFILE:-${DEBERTA_FAST_BENCH_PROFILE:-auto}}
RUN_TESTS=${RUN_TESTS:-1}
JSON=${BENCH_JSON:-}
status=0

echo "== environment"
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
PY

echo "== carried wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install --no-index --no-deps .whl/*.whl || echo "warning: some wheels in .whl/ did not install"
else
  echo "(no .whl/ folder)"
fi

echo "== install deberta_fast"
# --no-build-isolation: use this environment's torch (CUDA build -> the extension is compiled, see
# csrc/build_config.py) and its setuptools (works offline); --no-deps: never replace torch.
if ! $PY -m pip install --no-build-isolation --no-deps -e . ; then
  echo "error: pip install -e . failed"; exit 1
fi

echo "== benchmark dependencies"
$PY -c "import pytest_benchmark" 2>/dev/null || $PY -m pip install pytest-benchmark \
  || { echo "error: pytest-benchmark is missing and cannot be installed"; exit 1; }
$PY -c "import matplotlib" 2>/dev/null || $PY -m pip install matplotlib \
  || echo "warning: matplotlib not installable: the report will have no plots"
for peer in disentangled_flash flashdeberta einops; do
  $PY -c "import $peer" 2>/dev/null || echo "note: $peer not importable: its candidates will be skipped with the reason"
done

if [ "$RUN_TESTS" != "0" ]; then
  echo "== tests"
  $PY -m pytest tests -q || { echo "warning: the test suite failed (benchmarks run anyway)"; status=1; }
fi

echo "== benchmarks (profile=$PROFILE) -> benchmarks/results/"
# the session writes benchmarks/results/<date>-<device>-<profile>/ (JSON, table.md, plots) at its end
# shellcheck disable=SC2086
$PY -m pytest benchmarks/ -q --profile "$PROFILE" ${JSON:+--benchmark-json="$JSON"} ${BENCH_ARGS:-}
rc=$?
if [ $rc -ne 0 ]; then echo "warning: benchmarks exited with $rc"; status=1; fi
exit $status

#!/usr/bin/env bash
# The GPU checks of one lent device machine (an H100 or H200), in one call of at most 600 s.
# The machine has torch, torchvision, Triton and pytest, but not pycocotools: `make gpu-wheels` here
# puts its wheel in .whl/ (ignored by git), which the call carries. From the session, with the tool:
#   run(command="bash .ci/gpu-session.sh $(git rev-parse --short HEAD)", carry=[".whl"], timeout_s=600)
# (write the commit out: the command runs there, where .git is not the session's). Everything it
# makes lands in $OUT and comes back:
#   tests-changed.txt   the CUDA tests of the paths changed since the last GPU run (-s: they print their sizes)
#   graphs/<hw>.json    the whole bench with CUDA graphs and packed NMS rounds (the record candidate;
#                       its third inference arm is the same model with the graphs paused)
#   no-bits/<hw>.json   r50_fpn_gpu with graphs but without packed rounds: the A/B of the rounds
#   tests-all.txt       every CUDA test
# Each step has its own limit so that a hang in one still returns the others.
set -uo pipefail
commit=${1:?usage: gpu-session.sh COMMIT}
out=${OUT:?run me through the device tool, which sets OUT}
export FPNLIB_COMMIT=$commit PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, pycocotools; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" || exit 1

step() {  # step SECONDS LOGFILE COMMAND...: one step under its own limit, its log kept in $OUT
  local limit=$1 log=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$log" 2>&1
  echo "== $log: rc $? in $((SECONDS - t0)) s (limit $limit)"; tail -n 4 "$out/$log"
}

step 100 tests-changed.txt python3 -m pytest -p no:cacheprovider -s tests/test_cuda.py \
  -k "graph or nms or overlap or borderline or roialign or fused or busy"
FPNLIB_CUDA_GRAPHS=1 FPNLIB_NMS_BITS=1 step 220 bench-graphs.txt python3 -m fpnlib bench --out "$out/graphs"
FPNLIB_CUDA_GRAPHS=1 FPNLIB_NMS_BITS=0 step 80 bench-no-bits.txt \
  python3 -m fpnlib bench --configs r50_fpn_gpu --no-memory --no-runtime --out "$out/no-bits"
step 130 tests-all.txt python3 -m pytest -p no:cacheprovider tests/test_cuda.py

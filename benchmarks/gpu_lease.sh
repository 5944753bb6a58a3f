#!/usr/bin/env bash
# benchmarks/gpu.py inside one short device lease (this workplace lends 15 minutes of GPU time a
# session, machine start included): the sections in order of what matters most, each invocation
# under its own time limit. gpu.py writes each entry as soon as it is measured, so a limit that
# strikes loses only the entry in progress, and a later lease resumes with the same command.
#
#   here:  python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#              --implementation cp --platform manylinux2014_x86_64 -d .whl \
#              diffusers==0.42.1 importlib_metadata     # the GPU image has no diffusers
#   there: bash benchmarks/gpu_lease.sh "$OUT"          # about 9 minutes on an H100
set -u
out=${1:?usage: bash benchmarks/gpu_lease.sh OUTPUT_FOLDER}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1
nvidia-smi -L
gpu=(python3 -m benchmarks.gpu --out "$out/gpu.json" --workloads sd15 --rounds 5 --warmup 1)
section() {
    local limit=$1
    shift
    echo "== benchmarks.gpu $* (limit ${limit}s)"
    timeout -k 5 "$limit" "${gpu[@]}" "$@"
    echo "== exit $? after ${SECONDS}s"
}
section 100 --sections recipe --modes full --precisions bf16
section 120 --sections timing --precisions bf16
section 80 --sections recipe --modes lora --precisions bf16
section 30 --sections syncs
section 60 --sections memory
section 50 --sections bf16 --nan-steps 100
section 90 --sections recipe timing --precisions fp32

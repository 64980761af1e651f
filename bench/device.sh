#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, after `make setup` and nothing else, run
#   1. the smoke profile end to end (the reference stage on cuda in fp32, the only precision its cached log-probs
#      take; train on cuda under train.mixed_precision bf16, with a_lol_ref_free: the ratio algorithms,
#      a_lol included, refuse mixed precision),
#   2. bench/reference.py (the batched log-prob pass against the one-row loop) with bf16 weights,
#   3. bench/train.py (the stage, our step and TRL's SFTTrainer) under bf16 autocast,
# each printing tokens/s and the share of the bf16 matmul peak it measured in the same run; within 8 minutes.
# Without CUDA it is a dry run of the same commands on the CPU at small sizes (it checks that they work,
# its figures mean nothing).
#
#     bench/device.sh            # from anywhere; writes under a temporary run root, removed at the end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ALOL=${ALOL:-.venv/bin/alol}
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    device=cuda
    "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'
    reference_sizes=(--rows 256 --naive-rows 32 --rounds 3 --token-budget 16384 --matmul-size 8192)
    train_sizes=(--steps 8 --matmul-size 8192)
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "nvidia-smi sees a GPU but this torch has no CUDA ($("$PY" -c 'import torch; print(torch.__version__)')):" \
        "install a CUDA build of torch==2.13.0 into .venv (README, On a GPU), then run this again" >&2
    exit 1
else
    device=cpu
    echo "device: no CUDA here: a dry run on the CPU at small sizes (the figures below mean nothing)"
    reference_sizes=(--rows 8 --naive-rows 2 --rounds 1 --matmul-size 512)
    train_sizes=(--steps 2 --matmul-size 512)
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) cores"

step() {  # name, command...: runs one part, says how long it took
    local name=$1 clock
    shift
    clock=$(date +%s)
    echo
    echo "== $name"
    "$@"
    echo "== $name: $(($(date +%s) - clock)) s"
}

step "smoke profile (train.mixed_precision bf16, a_lol_ref_free)" \
    "$ALOL" run --profile smoke --set "run.root=$work/runs" --set train.mixed_precision=bf16 \
    --set train.algorithm=a_lol_ref_free
step "reference log-prob pass (bf16 weights)" \
    env PYTHONPATH=. "$PY" bench/reference.py --device "$device" --precision bf16 "${reference_sizes[@]}"
step "train step (bf16 autocast)" \
    env PYTHONPATH=. "$PY" bench/train.py --device "$device" --mixed-precision bf16 --algorithm a_lol_ref_free \
    --modes stage alol-loop trl-sft --root "$work/bench-train" "${train_sizes[@]}"

elapsed=$(($(date +%s) - started))
echo
echo "bench/device.sh on $device: $elapsed s in all (budget on a GPU: 480 s)"
if [ "$device" = cuda ] && [ "$elapsed" -gt 480 ]; then
    echo "over the 8-minute budget: shrink the sizes above" >&2
    exit 1
fi

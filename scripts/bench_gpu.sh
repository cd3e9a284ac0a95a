#!/usr/bin/env bash
# Every GPU check, one command on a machine with one CUDA GPU, in under 5 minutes (once .venv exists):
#   1. tests/test_no_sync_cuda.py: forward_step and the loss under set_sync_debug_mode("error"),
#      in a one-rank NCCL world (unpacked rows, and packed rows in Megatron's SFT form);
#   2. scripts/check_packed_attention_gpu.py: Transformer Engine's THD attention and fused RoPE
#      on the real, the compacted and the old (all padding kept) cu_seqlens lists (SKIP without TE);
#   3. scripts/bench_channel_loss.py --quick: the small per-microbatch grid with its cuda rows,
#      printed only (its GPU targets, at T = 128k, are judged by the full grid: BENCH_GPU_FULL=1);
#   4. scripts/bench_pretrain.py: a tiny GPT through Megatron's pretrain() with and without channel
#      tracking, one short round without the stock-again arm (extra arguments go to it after
#      --rounds 1 --iters 40 --warmup 20, so those three can be overridden).
# Each step runs to its end or its time limit, whatever the others did; a table of results
# follows, and the exit status is 1 unless every step passed.
#
# BENCH_GPU_FULL=1: the long versions instead (at most 45 minutes), which rewrite
# docs/performance.md: the full bench_channel_loss.py grid and bench_pretrain.py --write-doc.
source "$(dirname "$0")/_env.sh"
set +e  # _env.sh sets -e: here a failing step must not stop the next ones
export PYTHONWARNINGS=ignore

if ! python -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench_gpu.sh needs a CUDA GPU; the CPU half is python scripts/bench_channel_loss.py")
print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")'; then
    exit 1
fi

if [ "${BENCH_GPU_FULL:-0}" = 1 ]; then
    BUDGET=2700 CHANNEL_ARGS=() PRETRAIN_ARGS=(--write-doc)
    CAPS=(300 300 1500 1500)
else
    BUDGET=270  # seconds for all four steps together (a stopped step may take 10 more)
    CHANNEL_ARGS=(--quick) PRETRAIN_ARGS=(--rounds 1 --iters 40 --warmup 20 --no-stock-again)
    CAPS=(75 75 70 150)
fi
DEADLINE=$((SECONDS + BUDGET))
NAMES=() RESULTS=() CODES=() TIMES=()
CURRENT= CURRENT_NAME=
# Each step in a session of its own, so that a time limit stops all of it; --wait keeps the
# step's exit status should setsid have to fork. Without setsid a step's children may outlive it.
SETSID=$(command -v setsid)
if [ -n "$SETSID" ] && "$SETSID" --wait true 2>/dev/null; then SETSID="$SETSID --wait"; fi

descendants() {
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

stop_step() {
    # The step, everything it started, and the process groups among them: a step runs in a
    # session of its own, and bench_pretrain.py starts its torchrun runs in sessions of theirs.
    local pid=$1 procs p i alive
    procs="$pid $(descendants "$pid")"
    for p in $procs; do kill -TERM -- "-$p" "$p" 2>/dev/null; done
    for i in 1 2 3 4 5 6 7 8 9 10; do
        alive=0
        for p in $procs; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 1
    done
    for p in $procs; do kill -KILL -- "-$p" "$p" 2>/dev/null; done
}

run_step() {
    # run_step NAME CAP_SECONDS COMMAND...: run COMMAND for at most CAP_SECONDS (and never past
    # the deadline); record its result, exit code and duration.
    local name=$1 limit=$2 start pid rc result
    shift 2
    if ((DEADLINE - SECONDS < limit)); then limit=$((DEADLINE - SECONDS)); fi
    if ((limit < 20)); then
        NAMES+=("$name") RESULTS+=("NOT RUN") CODES+=("-") TIMES+=(0)
        echo "=== $name: not run, the time budget is spent"
        return
    fi
    echo
    echo "=== $name (at most ${limit}s): $*"
    start=$SECONDS
    $SETSID "$@" &
    pid=$!
    CURRENT=$pid CURRENT_NAME=$name
    while kill -0 "$pid" 2>/dev/null && ((SECONDS - start < limit)); do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "=== $name: stopped after ${limit}s"
        stop_step "$pid"
        wait "$pid" 2>/dev/null
        rc=124 result=TIMEOUT
    else
        wait "$pid"
        rc=$?
        if ((rc == 0)); then result=PASS; else result=FAIL; fi
    fi
    CURRENT=
    NAMES+=("$name") RESULTS+=("$result") CODES+=("$rc") TIMES+=($((SECONDS - start)))
}

print_table() {
    local i failed=0
    echo
    printf '%-44s %-11s %-5s %s\n' "step" "result" "exit" "seconds"
    for i in "${!NAMES[@]}"; do
        printf '%-44s %-11s %-5s %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${CODES[$i]}" "${TIMES[$i]}"
        [ "${RESULTS[$i]}" = PASS ] || failed=1
    done
    return $failed
}

interrupted() {
    if [ -n "$CURRENT" ]; then
        stop_step "$CURRENT"
        NAMES+=("$CURRENT_NAME") RESULTS+=(INTERRUPTED) CODES+=(130) TIMES+=("-")
    fi
    echo "=== interrupted"
    print_table
    exit 130
}
trap interrupted INT TERM

run_step "tests/test_no_sync_cuda.py" "${CAPS[0]}" \
    python -m pytest -q -p no:cacheprovider tests/test_no_sync_cuda.py
run_step "scripts/check_packed_attention_gpu.py" "${CAPS[1]}" \
    python scripts/check_packed_attention_gpu.py
run_step "scripts/bench_channel_loss.py ${CHANNEL_ARGS[*]}" "${CAPS[2]}" \
    python scripts/bench_channel_loss.py "${CHANNEL_ARGS[@]}"
run_step "scripts/bench_pretrain.py ${PRETRAIN_ARGS[*]} $*" "${CAPS[3]}" \
    python scripts/bench_pretrain.py "${PRETRAIN_ARGS[@]}" "$@"

if print_table; then
    echo "all GPU checks passed"
    exit 0
fi
echo "some GPU checks did not pass (see above)"
exit 1

#!/usr/bin/env bash
# GPU smoke test: a short pretraining job of the tiny and the base model on one GPU
# (one rank through NCCL), on the project's synthetic corpus. Prints tokens/s, MFU and the
# loss at the start and the end of each job; fails if a job fails or its loss does not fall.
# On a GPU it first runs `bertrain bench dense` (the dense op's cuBLASLt products against
# burn's ops: values and gradients; then the fused residual + LayerNorm and attention
# softmax against burn's). A model named `NAME+cublaslt` is the same job with BERTRAIN_DENSE=cublaslt,
# `NAME+fused` with BERTRAIN_KERNELS=fused (the LayerNorm, softmax and AdamW kernels), `NAME+cublaslt+fused` with both; their
# last-five loss must be within 5% of NAME's (bf16 noise).
#
#   scripts/gpu-smoke.sh [BERTRAIN]        (default: target/release/bertrain, built with
#                                           `cargo build --release --features cuda`)
#
# Environment: MODELS (default "tiny base base+cublaslt base+cublaslt+fused" on a GPU, "tiny base" otherwise), STEPS (default 200), BATCH (sequences per step,
# default 32), PRECISION (default bf16), DEVICE (the GPU to use, through CUDA_VISIBLE_DEVICES;
# default GPU 0), BACKEND (default cuda; "cpu" runs the same script on a machine without a GPU,
# which is how CI checks the script itself, with PRECISION=fp32), KEEP (a directory: each job's
# log and metrics.jsonl are copied there before the work directory is removed).
# NCCL must be loadable: put the directory holding libnccl.so.2 on LD_LIBRARY_PATH.
set -euo pipefail

bin=$(realpath "${1:-target/release/bertrain}")
steps=${STEPS:-200}
batch=${BATCH:-32}
precision=${PRECISION:-bf16}
backend=${BACKEND:-cuda}
if [[ $backend == cuda ]]; then
    models=${MODELS:-tiny base base+cublaslt base+cublaslt+fused}
else
    models=${MODELS:-tiny base}
fi
if [[ -n ${DEVICE:-} ]]; then
    export CUDA_VISIBLE_DEVICES=$DEVICE
fi

work=$(mktemp -d -t bertrain-gpu-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT

echo "== data: synthetic corpus -> vocab -> shards (seq 128) in $work"
"$bin" synth-corpus --output "$work/corpus.txt" --docs 2000
"$bin" vocab --input "$work/corpus.txt" --vocab-size 8000 --output "$work/vocab.txt"
"$bin" dataprep --input "$work/corpus.txt" --vocab "$work/vocab.txt" --output "$work/data" \
    --max-seq-len 128 --dupe-factor 2 --quiet

# The mean of the "loss" field over step lines FROM..TO of a metrics.jsonl.
mean_loss() {
    grep '"step_time_s"' "$1" | sed -n "$2,$3p" | grep -o '"loss":[0-9.eE+-]*' |
        awk -F: '{ s += $2; n++ } END { if (n) printf "%.4f", s / n; else print "nan" }'
}

results=()
failed=0
declare -A last_loss
if [[ $backend == cuda ]]; then
    echo "== dense op: cuBLASLt against burn's ops; fused LayerNorm and softmax against burn's ($precision)"
    "$bin" bench dense --precision "$precision" --iters 5 || failed=1
fi
for model in $models; do
    preset=${model%%+*}
    dense=burn
    [[ $model == *+cublaslt* ]] && dense=cublaslt
    kernels=burn
    [[ $model == *+fused* ]] && kernels=fused
    case $preset in
        tiny) lr=1e-3 ;;
        *) lr=1e-4 ;;
    esac
    port=$((20000 + RANDOM % 20000))
    slug=${model//+/-}
    run="$work/run-$slug"
    cat > "$work/$model.toml" <<JOB
[job]
name = "smoke-$slug"
run_dir = "$run"

[model]
preset = "$preset"

[data]
manifest = "$work/data/manifest.json"

[train]
global_batch_size = $batch
micro_batch_size = $batch
max_steps = $steps
lr = $lr
warmup_steps = $((steps / 10))
precision = "$precision"
seed = 0

[checkpoint]
every_steps = 0
keep_last = 1

[cluster]
coordinator = "127.0.0.1:$port"
world_size = 1
backend = "$backend"
JOB
    echo "== $model: $steps steps, batch $batch, seq 128, $precision, backend $backend, dense op $dense, kernels $kernels"
    status=ok
    BERTRAIN_DENSE=$dense BERTRAIN_KERNELS=$kernels "$bin" launch --config "$work/$model.toml" 2>&1 | tee "$work/$model.log" || status="job failed"
    metrics="$run/metrics.jsonl"
    line=$(grep -o 'throughput of rank 0, .*' "$work/$model.log" | tail -n 1 || true)
    tokens=$(sed -n 's/.*: \([0-9]*\) tokens\/s.*/\1/p' <<< "$line")
    mfu=$(sed -n 's/.*MFU \([0-9.]*%\).*/\1/p' <<< "$line")
    first=nan last=nan
    if [[ -f $metrics ]]; then
        first=$(mean_loss "$metrics" 1 5)
        last=$(mean_loss "$metrics" $((steps - 4)) "$steps")
    fi
    if [[ $status == ok ]] && ! awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }'; then
        status="loss did not fall"
    fi
    last_loss[$model]=$last
    if [[ $status == ok && $model != "$preset" && -n ${last_loss[$preset]:-} ]] &&
        ! awk -v a="${last_loss[$preset]}" -v b="$last" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 0.05 * a) }'; then
        status="loss differs from $preset's by more than 5%"
    fi
    [[ $status == ok ]] || failed=1
    if [[ -n ${KEEP:-} ]]; then
        mkdir -p "$KEEP"
        cp "$work/$model.log" "$KEEP/$model.log"
        if [[ -f $metrics ]]; then cp "$metrics" "$KEEP/$model.metrics.jsonl"; fi
    fi
    results+=("$(printf '%-14s %10s %8s %12s %12s   %s' "$model" "${tokens:--}" "${mfu:--}" "$first" "$last" "$status")")
done

echo
echo "== gpu-smoke: $steps steps per model, batch $batch, seq 128, $precision, backend $backend"
printf '%-14s %10s %8s %12s %12s   %s\n' model tokens/s MFU "loss 1-5" "loss last 5" result
printf '%s\n' "${results[@]}"
exit $failed

#!/usr/bin/env bash
# Every GPU check of this project in one run, for a GPU machine lent for a few minutes.
# Each section's output goes to $OUT/<section>.log; the end is one table of sections with
# their result and seconds, and the figures to copy into README. Exit status: non-zero when
# a section failed.
#
#   scripts/gpu-check.sh [BERTRAIN]      (default: target/release/bertrain, built with
#                                         `cargo build --release --features cuda`; a
#                                         BERTRAIN ending in .gz, as scripts/gpu-pack.sh
#                                         makes it, is unpacked first)
#
# Sections (SECTIONS, default all, in this order):
#   dense     bench dense: cuBLASLt's dense products against burn's (values, gradients, time)
#   step      bench step, base and large at 128 and 512, burn's products
#   step-lt   the same with BERTRAIN_DENSE=cublaslt and BERTRAIN_KERNELS=fused (skipped
#             when `dense` failed: it also compares the fused kernels with burn's)
#   smoke     scripts/gpu-smoke.sh: tiny, base, base+cublaslt, base+cublaslt+fused train 200
#             steps through NCCL
#   finetune  the demo on the CPU (for its model and task), then `bertrain finetune
#             --backend cuda` on the same task: accuracy within 0.05 of the CPU's
# Environment: OUT (default gpu-check), ITERS (bench step rounds, default 3), SECTIONS,
# SECTION_TIMEOUT (seconds, default 300: a section that hangs is stopped and marked failed,
# and the next one runs).
# NCCL and cuBLASLt are looked for on LD_LIBRARY_PATH, then anywhere on the machine (NVIDIA's
# Python wheels put them in site-packages/nvidia/*/lib).
set -uo pipefail

bin=$(realpath "${1:-target/release/bertrain}")
out=${OUT:-gpu-check}
iters=${ITERS:-3}
limit=${SECTION_TIMEOUT:-300}
sections=${SECTIONS:-dense step step-lt smoke finetune}
here=$(dirname "$(realpath "$0")")
mkdir -p "$out"
out=$(realpath "$out")

for lib in libnccl.so.2 libcublasLt.so.13; do
    found=
    for dir in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do
        [[ -e $dir/$lib ]] && found=$dir
    done
    if [[ -z $found ]]; then
        found=$(find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1)
        if [[ -n $found ]]; then
            export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        fi
    fi
    echo "$lib: ${found:-not found}"
done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

work=$(mktemp -d -t bertrain-gpu-check.XXXXXX)
trap 'rm -rf "$work"' EXIT
if [[ $bin == *.gz ]]; then
    gunzip -c "$bin" > "$work/bertrain"
    chmod +x "$work/bertrain"
    bin=$work/bertrain
fi
declare -A result seconds
dense_ok=1

# run SECTION COMMAND...: runs the command, its output to the section's log and the screen.
run() {
    local section=$1
    shift
    echo "== $section: $*"
    local started=$SECONDS
    if timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$section.log"; then
        result[$section]=ok
    else
        result[$section]=failed
    fi
    seconds[$section]=$((SECONDS - started))
}

finetune_check() {
    "$bin" demo --run-dir "$work/demo" || return 1
    local task=$work/demo/finetune
    "$bin" finetune --backend cuda --model "$work/demo/model" \
        --train "$task/train.tsv" --validation "$task/validation.tsv" \
        --text-columns sentence --label-column region --epochs 3 --lr 2e-4 \
        --batch-size 16 --max-seq-len 64 --seed 0 --quiet --output "$work/finetune-cuda" || return 1
    final() { grep '"final"' "$1/metrics.jsonl" | grep -o '"value":[0-9.eE+-]*' | cut -d: -f2; }
    local cpu gpu
    cpu=$(final "$task/pretrained")
    gpu=$(final "$work/finetune-cuda")
    echo "fine-tuning accuracy: CPU $cpu, GPU $gpu"
    awk -v a="$cpu" -v b="$gpu" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 0.05) }'
}

for section in $sections; do
    case $section in
        dense)
            run dense "$bin" bench dense --precision bf16 --iters 5
            [[ ${result[dense]} == ok ]] || dense_ok=0
            ;;
        step)
            run step "$bin" bench step --backend cuda --precision bf16 \
                --presets base,large --seq 128,512 --iters "$iters"
            ;;
        step-lt)
            if [[ $dense_ok == 1 ]]; then
                run step-lt env BERTRAIN_DENSE=cublaslt BERTRAIN_KERNELS=fused \
                    "$bin" bench step --backend cuda \
                    --precision bf16 --presets base,large --seq 128,512 --iters "$iters"
            else
                result[step-lt]="skipped (dense failed)"
                seconds[step-lt]=0
            fi
            ;;
        smoke)
            run smoke env KEEP="$out/smoke" "$here/gpu-smoke.sh" "$bin"
            ;;
        finetune)
            export bin work
            export -f finetune_check
            run finetune bash -c finetune_check
            ;;
        *)
            echo "unknown section $section (dense, step, step-lt, smoke, finetune)" >&2
            exit 2
            ;;
    esac
done

echo
echo "== gpu-check: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
printf '%-10s %-24s %8s\n' section result seconds
failed=0
for section in $sections; do
    printf '%-10s %-24s %8s\n' "$section" "${result[$section]}" "${seconds[$section]}"
    [[ ${result[$section]} == failed ]] && failed=1
done
for section in step step-lt; do
    if [[ -f $out/$section.log ]]; then
        echo
        echo "$section:"
        grep '^|' "$out/$section.log"
    fi
done
[[ -f $out/smoke.log ]] && sed -n '/== gpu-smoke:/,$p' "$out/smoke.log"
[[ -f $out/finetune.log ]] && grep 'fine-tuning accuracy' "$out/finetune.log"
exit $failed

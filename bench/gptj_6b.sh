#!/usr/bin/env bash
# GPT-J-6B on a 24 GiB machine without a GPU: bounded-memory exports and int4 decode speed against CTranslate2.
# Every command runs under /usr/bin/time -v; the logs in $WORK/logs hold the peak RSS ("Maximum resident set
# size") and wall time of each. Needs ~40 GB of disk at most (the fp16 artifact is deleted once measured).
#
#   bash bench/gptj_6b.sh [WORK]        # default WORK=/tmp/gptj
set -euo pipefail
WORK=${1:-/tmp/gptj}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK/logs"
measure() {  # measure NAME CMD...: run CMD under /usr/bin/time -v, print its peak RSS and wall time
    local name=$1; shift
    grep -q "Exit status: 0" "$WORK/logs/$name.log" 2>/dev/null && echo "$name: measured before (delete $WORK/logs/$name.log to redo)" ||
    /usr/bin/time -v "$@" > "$WORK/logs/$name.log" 2>&1 || { echo "$name failed:"; tail -5 "$WORK/logs/$name.log"; return 1; }
    local rss wall
    rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2 / 1048576}' "$WORK/logs/$name.log")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/logs/$name.log")
    echo "$name: peak RSS $rss GiB, wall $wall"
}

# 1. Exports with random weights, generated tensor by tensor (no download).
measure export-random-fp16 gptexport gpt-j-6b --random-weights --fp16 -o "$WORK/random-fp16" --force
rm -rf "$WORK/random-fp16"
measure export-random-int4 gptexport gpt-j-6b --random-weights --int4 -o "$WORK/random-int4" --force

# 2. A GPT-J-6B-shaped fp16 safetensors checkpoint (random weights, same generator), and exports from it.
[ -f "$WORK/checkpoint/model.safetensors" ] || measure checkpoint python "$HERE/gptj_6b.py" checkpoint "$WORK/checkpoint"
measure export-checkpoint-fp16 gptexport "$WORK/checkpoint" --fp16 -o "$WORK/ckpt-fp16" --force
rm -rf "$WORK/ckpt-fp16"
measure export-checkpoint-int4 gptexport "$WORK/checkpoint" --int4 -o "$WORK/ckpt-int4" --force

# 3. CTranslate2 int8 of the same checkpoint (its converter loads the checkpoint in transformers).
measure ct2-convert-int8 ct2-transformers-converter --model "$WORK/checkpoint" --quantization int8 \
    --output_dir "$WORK/ct2-int8" --force || echo "CTranslate2 conversion failed (see $WORK/logs/ct2-convert-int8.log)"

# 4. Decode speed, each engine in its own process.
CT2=(); [ -f "$WORK/ct2-int8/model.bin" ] && CT2=(--ct2 "$WORK/ct2-int8")
python "$HERE/gptj_6b.py" decode --ours "$WORK/ckpt-int4" "${CT2[@]}" | tee "$WORK/logs/decode.txt"

#!/usr/bin/env bash
# The GPU run of docs/benchmarks.md in one command, every step logged to OUT and the run going on past a failed
# step (a summary at the end names each step's exit status):
#
#     tools/gpu_run.sh OUT                  # on a GPU machine, after pip install -e ".[train,serve,dev,cuda]"
#     DEVICE=cpu SHAPES=default LENGTHS=64,128 tools/gpu_run.sh OUT     # the same steps on a CPU, small
#
# Steps: the test suite (tests/test_cuda.py runs where CUDA can); bf16 training of the head on tiny backbones,
# then resumed; a few training steps at SHAPES; `maria bench` at SHAPES and DTYPE, batch 1 and 8; the decode
# step's profile and floor at batch 1 and 8; the step exported with --attention fused, timed beside the bench's
# (eager) step; speculative infilling against the plain engine on the shipped model and its held-out text;
# `maria serve` answering one request.
set -u
OUT=${1:?usage: tools/gpu_run.sh OUT}
DEVICE=${DEVICE:-cuda} SHAPES=${SHAPES:-paper} DTYPE=${DTYPE:-fp16} LENGTHS=${LENGTHS:-128,256,512,1024,2047}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {            # step NAME COMMAND...: runs it, its output in OUT/NAME.log, its status in the summary
    local name=$1; shift
    local began=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status, $((SECONDS - began)) s" | tee -a "$SUMMARY"
}

nvidia-smi > "$OUT/nvidia-smi.log" 2>&1
{ maria --version; python -c "import torch; print('torch', torch.__version__, torch.cuda.is_available())"; } \
    > "$OUT/versions.log" 2>&1

step tests python -m pytest -p no:cacheprovider

tiny="$OUT/tiny"
step tiny-backbones python -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path
from tiny import make_pair, write_corpus; make_pair(Path('$tiny'), 'olmo'); write_corpus(Path('$tiny/train.txt'), 2000)"
train_tiny=(maria train --mlm "$tiny/mlm" --ar "$tiny/ar-olmo" --data "$tiny/train.txt" --out "$tiny/run"
            --seq-len 64 --batch-size 16 --learning-rate 3e-3 --eval-every 50 --save-every 100 --device "$DEVICE")
step train-tiny "${train_tiny[@]}" --steps 300
step train-tiny-resumed "${train_tiny[@]}" --steps 400

shaped="$OUT/shapes-$SHAPES"
step shaped-backbones python -c "import random; from pathlib import Path
from maria_onnx.tools.shapes import load_shapes, random_checkpoint; random_checkpoint(load_shapes('$SHAPES'), Path('$shaped'))
rng = random.Random(0); Path('$shaped/train.txt').write_text(''.join(' '.join(f'w{rng.randrange(6, 3000)}'
for _ in range(400)) + '\n' for _ in range(200)))"
step train-shaped maria train --mlm "$shaped/mlm" --ar "$shaped/ar" --data "$shaped/train.txt" --out "$shaped/run" \
    --steps 6 --seq-len 256 --batch-size 8 --eval-every 3 --save-every 3 --device "$DEVICE"

step bench maria bench --checkpoint "$shaped/maria" --dtype "$DTYPE" --device "$DEVICE" --lengths "$LENGTHS" \
    --batch-sizes 1,8 --repeats 5 --out "$OUT/bench"
for batch in 1 8; do
    step "profile-b$batch" python -m maria_onnx.tools.profile_step "$OUT/bench/bundle-$DTYPE" "$OUT/step-profile-b$batch.json" \
        --device "$DEVICE" --batch "$batch" --cached 1024
done

step bench-speculate maria bench --model runtime/default_model --text tests/data/default_model_eval_windows.npy \
    --device "$DEVICE" --lengths 128,1024 --batch-sizes 1,8 --repeats 5 --speculate 4 --no-concat \
    --out "$OUT/bench-speculate"

fused="$OUT/bundle-$DTYPE-fused"
step export-fused maria export "$shaped/maria" --out "$fused" --dtype "$DTYPE" --attention fused \
    --no-concat-decoder --no-baseline-heads
step compare-attention python -m maria_onnx.tools.compare_steps "$OUT/bench/bundle-$DTYPE" "$fused" \
    "$OUT/compare-attention.json" --device "$DEVICE"

serve() {
    maria serve --model "$OUT/bench/bundle-$DTYPE" --device "$DEVICE" --port 0 2> "$OUT/serve-stderr.log" &
    local server=$! url=""
    for _ in $(seq 300); do
        url=$(grep -o "http://127.0.0.1:[0-9]*" "$OUT/serve-stderr.log" | head -1)
        [ -n "$url" ] || ! kill -0 $server 2> /dev/null && break
        sleep 1
    done
    local status=1
    if [ -n "$url" ]; then
        curl -s --max-time 120 "$url/v2/models/maria/infer" \
            -d '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["w10 w11 [MASK] w12"]}]}' \
            | tee /dev/stderr | grep -q '"outputs"' && status=0
        curl -s --max-time 30 "$url/v2/models/maria/stats" > "$OUT/serve-stats.json"     # the request's phases
    fi
    kill -TERM $server 2> /dev/null; wait $server
    return $status
}
step serve serve


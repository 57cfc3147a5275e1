#!/usr/bin/env bash
# GPU checks in one run: CNS on the full SD-1.5 architecture (random weights) through the
# command-line tool, beside a learning-rate sweep on the tiny world (benchmarks/learning_sweep.py,
# SWEEP_PROCS processes sharing the GPU); then, alone, the train-step and inference benchmarks.
#
#     bash benchmarks/gpu.sh OUT_DIR                 # on a CUDA machine, from the repo root
#     MODEL=dummy RES=64 STEPS=4 DEVICE=cpu bash benchmarks/gpu.sh /tmp/gpu-dry   # a dry run
#
# Every stage has its own time limit and writes its log to OUT_DIR; a failed stage does not
# stop the next. Needs diffusers, transformers, accelerate, peft beside a CUDA torch
# (`pip install -e .[eval]`, or PYTHONPATH=src with those installed).
set -uo pipefail
out="${1:?usage: benchmarks/gpu.sh OUT_DIR}"
mkdir -p "$out"
MODEL="${MODEL:-sd15}" RES="${RES:-512}" STEPS="${STEPS:-100}" DEVICE="${DEVICE:-cuda}"
PREC="${PREC:-bf16}" DTYPE="${DTYPE:-fp16}" WORK="${WORK:-$(mktemp -d)}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error

END=${PHASE1_SECONDS:-100000}  # no stage of a phase runs past its end (seconds since the start)
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  (( END - SECONDS < limit )) && limit=$((END - SECONDS))
  if (( limit < 5 )); then echo "== $name: skipped, out of time" | tee -a "$out/summary.txt"; return; fi
  echo "== $name ($(date +%T), limit ${limit}s)" | tee -a "$out/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s" | tee -a "$out/summary.txt"
  tail -n 25 "$out/$name.log"
}

stage env 60 python - <<'EOF'
import torch, diffusers, transformers, accelerate
print("torch", torch.__version__, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__,
      "| accelerate", accelerate.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

# 1a. The tiny-world sweep, in the background (its own time limit).
SWEEP_PROCS="${SWEEP_PROCS:-8}" SWEEP_LIMIT="${SWEEP_LIMIT:-$((END - SECONDS))}"
SWEEP_GRID="${SWEEP_GRID:-select_ratio=0.1 lr_neurons=1e-3,3e-3,1e-2 lr_embedding=1e-3,5e-3 neurons=concept,all steps=300,1000}"
echo "== sweep ($(date +%T), $SWEEP_PROCS processes, limit ${SWEEP_LIMIT}s): $SWEEP_GRID" | tee -a "$out/summary.txt"
for ((i = 0; i < SWEEP_PROCS; i++)); do
  OMP_NUM_THREADS=1 timeout "$SWEEP_LIMIT" python benchmarks/learning_sweep.py --out "$out/sweep" --device "$DEVICE" \
    --threads 1 --shard "$i/$SWEEP_PROCS" --grid $SWEEP_GRID >"$out/sweep_$i.log" 2>&1 &
done

# 1b. Meanwhile, the user's path on a full-size model: init, learn two concepts one after the
#     other, check, generate both in one prompt (times here share the machine with the sweep).
stage build_model 240 python - "$WORK/model" "$MODEL" <<'EOF'
import sys, time
t = time.perf_counter()
from cns.testing import make_dummy_pipeline, make_sd15_architecture
pipe = make_sd15_architecture() if sys.argv[2] == "sd15" else make_dummy_pipeline()
pipe.save_pretrained(sys.argv[1])
print(f"built and saved {sys.argv[2]} in {time.perf_counter() - t:.1f} s; UNet "
      f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M parameters")
EOF
python -m cns.world.concepts --n 4 --size 128 "$WORK/concepts" >/dev/null
stage init 120 python -m cns init "$WORK/lib" --model "$WORK/model"
learn() {  # learn NAME CONCEPT
  stage "$1" 300 python -m cns learn "$WORK/lib" --images "$WORK/concepts/$2" \
    --class-word "$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['class_word'])" "$WORK/concepts/$2/concept.json")" \
    --steps "$STEPS" --resolution "$RES" --mixed-precision "$PREC" --num-class-images 8 --class-image-steps 25 --device "$DEVICE"
}
learn learn_1 berry-heart
learn learn_2 halftone
stage show 60 python -m cns show "$WORK/lib"
stage check 300 python -m cns check "$WORK/lib" --base
stage generate 240 python -m cns generate "$WORK/lib" "a <new1> heart on a dotted background, <new2> style" -n 2 \
  --steps 25 --height "$RES" --width "$RES" --out "$out/generated"

wait
echo "   sweep: $(cat "$out"/sweep/results.jsonl 2>/dev/null | wc -l) settings finished" | tee -a "$out/summary.txt"

END=${TOTAL_SECONDS:-100000}
# 2. Benchmarks (docs/performance.md), alone on the machine: CNS's step against plain K/V fine-tuning and LoRA,
#    and generation time with 0, 1 and 7 learned concepts.
stage train_step 300 python benchmarks/train_step.py --model "$MODEL" --resolution "$RES" --device "$DEVICE" \
  --dtype "$DTYPE" --steps 20 --repeats 2
stage inference 240 python benchmarks/inference.py --model "$MODEL" --resolution "$RES" --steps 25 --repeats 3 \
  --device "$DEVICE" --dtype "$DTYPE"
echo "work folder: $WORK" | tee -a "$out/summary.txt"

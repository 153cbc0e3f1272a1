#!/usr/bin/env bash
# Every GPU check of isheep in one run (302 s on an H200, each bench capped: 550 s at most), its tables under
# $OUT (gpu.log: everything; summary.txt: each bench's key=value line). Most important first, so a
# run cut short still brings back the 7B figures.
#
#   here, once:   bash bench/gpu.sh prepare   # into .whl/ and .gpu/ (both ignored by git): the wheels, a
#                                             # tokenizer, a tiny model, the seed tasks, the baseline's isheep.py
#   on the GPU:   bash bench/gpu.sh           # with .whl and .gpu carried
#   a rerun of some: ONLY="responses_7b_128 judge_7b" bash bench/gpu.sh
#
# Nothing can be downloaded there: models are random weights of Qwen2-0.5B's and Qwen2-7B's
# shapes, built on the GPU; the tokenizer is the demo model's (its ids beyond it decode to nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
BASELINE=bbc8da6   # the engine before static caches and CUDA graphs (issue 11's same-run comparison)

if [ "${1:-}" = prepare ]; then
  set -e
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .whl .gpu && mkdir -p .whl .gpu
  version=$(python -c "import transformers; print(transformers.__version__)")   # the version requirements.txt pins
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "transformers==$version" "regex>=2025.10.22"
  git show "$BASELINE:isheep.py" > .gpu/isheep_baseline.py
  cp ../shared/data/self_instruct_seed_tasks.jsonl .gpu/   # ../shared does not travel to the GPU machine
  PYTHONPATH=. python - <<'PY'
import torch, isheep, test_isheep as T
from types import SimpleNamespace
from transformers import LlamaForCausalLM
isheep.load_tokenizer(isheep.demo_model_ref(), SimpleNamespace(trust_remote_code=False)).save_pretrained(".gpu/tokenizer")
tok = T.make_tokenizer()
torch.manual_seed(0)
T.imprint(LlamaForCausalLM(T.tiny_config(tok, tie_word_embeddings=True)), tok, steps=400).save_pretrained(".gpu/tiny")
tok.save_pretrained(".gpu/tiny")
PY
  du -sh .whl .gpu
  exit 0
fi

OUT=${OUT:-/tmp/isheep_gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"

run() {   # run NAME SECONDS COMMAND...: its output into the log, its key=value line into summary.txt
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo; echo "=== $name: $*"; local t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "/tmp/$name.txt" | grep -v "it/s]"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  echo "$name rc=$rc seconds=$((SECONDS - t0)) $(grep -E '^[a-z_]+=' "/tmp/$name.txt" | tail -1)" >> "$OUT/summary.txt"
}
B=(python3 bench/generate.py --device cuda --dtype bf16 --tokenizer .gpu/tokenizer --seeds .gpu/self_instruct_seed_tasks.jsonl
   --seq-n 0 --hf-batch-size 0)

# 1. Responses stage, 7B shape: isheep against generate_batch (default, and use_cuda_graph=True), the step time
run responses_7b_128 135 "${B[@]}" --shape 7b --n 128 --cb-cuda-graph
run responses_7b_256 75 "${B[@]}" --shape 7b --n 256
# 2. The other two stages, 7B shape: this isheep, then the baseline's on the same workload
run instructions_7b 40 "${B[@]}" --shape 7b --stage instructions --n 16
run instructions_7b_baseline 50 "${B[@]}" --shape 7b --stage instructions --n 16 --isheep .gpu/isheep_baseline.py
run judge_7b 30 "${B[@]}" --shape 7b --stage judge --n 128
run judge_7b_baseline 30 "${B[@]}" --shape 7b --stage judge --n 128 --isheep .gpu/isheep_baseline.py
# 3. 0.5B shape; then greedy text in fp32 against HF generate alone
run responses_05b 70 "${B[@]}" --shape 0.5b --n 64 --cb-cuda-graph
run greedy_05b_fp32 30 "${B[@]}" --shape 0.5b --dtype fp32 --n 8 --max-new-tokens 64 --greedy --greedy-n 8 --no-continuous
# 4. One round of isheep.py on the tiny model: plain, then under accelerate launch with FSDP2 (1 process)
ROUND=(--model .gpu/tiny --seeds seeds.jsonl --iters 1 --num-instructions 6 --max-attempts 6 --max-new-tokens 24
       --synth-max-new-tokens 120 --lora-rank 4 --batch-size 4 --epochs 1 --warmup-steps 1 --lr 1e-3 --max-len 1024
       --eval-size 8 --no-progress --overwrite)   # --overwrite: a rerun on the same machine starts over
run round_plain 40 python3 isheep.py --out /tmp/round_plain "${ROUND[@]}"
cat > /tmp/fsdp2.yaml <<'YAML'
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: bf16
num_machines: 1
num_processes: 1
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
YAML
run round_fsdp2 50 accelerate launch --config_file /tmp/fsdp2.yaml isheep.py --out /tmp/round_fsdp2 "${ROUND[@]}"
echo; echo "=== summary"; cat "$OUT/summary.txt"
echo; echo "=== issue 11's targets"
python3 - "$OUT/summary.txt" <<'PY' | tee "$OUT/targets.txt"
import sys
runs = {line.split()[0]: dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv) for line in open(sys.argv[1])}
def get(name, key):
    return float(runs.get(name, {}).get(key, "nan").split("/")[0])
def ratio(a, b):
    return get(a, "isheep_tok_s") / get(b, "isheep_tok_s")
checks = [("7B, 128 prompts: >= 3x the best generate_batch", get("responses_7b_128", "ratio_vs_best_hf"), 3),
          ("7B, 256 prompts: >= 3x the best generate_batch", get("responses_7b_256", "ratio_vs_best_hf"), 3),
          ("7B step at 128 rows: floor / step >= 1/3", get("responses_7b_128", "roofline_fraction"), 1 / 3),
          ("0.5B, 64 prompts: >= 3x the best generate_batch", get("responses_05b", "ratio_vs_best_hf"), 3),
          ("instructions, 7B: >= 2x the baseline", ratio("instructions_7b", "instructions_7b_baseline"), 2),
          ("judge, 7B: no slower than the baseline", ratio("judge_7b", "judge_7b_baseline"), 1),
          ("judge, 7B: prompt tokens at >= 40% of the bf16 peak", get("judge_7b", "prompt_peak_fraction"), 0.4),
          ("greedy fp32, 0.5B: every text equal to HF alone",
           get("greedy_05b_fp32", "greedy_match") / float(runs.get("greedy_05b_fp32", {}).get("greedy_match", "0/1").split("/")[1]), 1),
          ("a round, plain: exit 0", float(get("round_plain", "rc") == 0), 1),
          ("a round, FSDP2: exit 0", float(get("round_fsdp2", "rc") == 0), 1)]
for what, value, target in checks:
    print(f"{'PASS' if value >= target else 'FAIL'}  {what}: {value:.3f} (target {target:.3f})")
PY
grep -h "note: decoding without CUDA graphs" /tmp/*.txt | sort | uniq -c || true

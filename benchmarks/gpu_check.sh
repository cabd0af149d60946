#!/usr/bin/env bash
# Accelerator check (issue 6, part 5): eval-throughput benchmark + train-step benchmark + a short
# ResNet-20 FGQ fine-tune, one table, in about five minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh [OUTDIR] [--cpu|--gpu]      (make gpu-check)
#
# OUTDIR: where the results go (default: $OUT if set, else benchmarks/results/gpu_check).
# --cpu / --gpu: force the size preset; default: auto (--gpu when jax's default backend is a GPU).
# The CPU preset runs the same steps at tiny sizes (about 5 minutes on the loaded 2-core dev box), so
# the script is exercised before any accelerator is at hand.
#
# Environment:
#   PY                   python to use (default: .venv/bin/python if present, else python3)
#   FGQ_SHARED_DIR       shared data root (data/cifar10-jpeg/*.tar.gz; models/cifar-resnet/*.th)
#   FGQ_DATA_DIR         array cache (default <repo>/.cache/tfds; without tensorflow-datasets the
#                        CIFAR-10-JPEG tarballs are decoded with Pillow and cached there)
#   FGQ_INIT_CHECKPOINT  ResNet-20 start point for the fine-tune: a saved-variables dir or a .th file
#                        (default: $FGQ_SHARED_DIR/models/cifar-resnet/resnet20-12fca82f.th if it
#                        exists, else random init — then only the timings mean something)
#   FT_STEPS             fine-tune steps (default: 300 GPU, 4 CPU)
#
# Writes (flat, few files): OUTDIR/gpu_check.md (the table), gpu_check.json (all numbers),
# gpu_check.log (everything printed), finetune.log. Exit status: non-zero if a step failed.
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

OUTDIR="" PRESET=auto
for a in "$@"; do
  case "$a" in
    --cpu) PRESET=cpu ;;
    --gpu) PRESET=gpu ;;
    -h|--help) sed -n 2,26p "$0"; exit 0 ;;
    -*) echo "unknown option $a" >&2; exit 2 ;;
    *) OUTDIR="$a" ;;
  esac
done
OUTDIR="${OUTDIR:-${OUT:-$REPO/benchmarks/results/gpu_check}}"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
if [ -z "${PY:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

T0=$(date +%s)
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
[ "$PRESET" = auto ] && { [ "$BACKEND" = gpu ] && PRESET=gpu || PRESET=cpu; }
say "[gpu_check] backend=$BACKEND preset=$PRESET python=$PY out=$OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fgq_gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

if [ "$PRESET" = gpu ]; then
  # integer-n4 is left out (same arithmetic as integer-n64, another compile); fake-n4 reuses
  # fake-n64's executable. Timeouts bound the worst case to ~9.5 min (expected: ~5 min).
  EVAL_ARGS=(--model both --batch-size 128 --batches 10 --repeats 5
             --variants fp32,fake-n4,fake-n64,integer-n64,literal-n64)
  TRAIN_ARGS=(--batch-size 128 --repeats 20 --sizes 4,64)
  FT_STEPS="${FT_STEPS:-300}"
  FT_ARGS=(--set batch_size=128 --set calib_images=256 --set bn_images=1024 --set time_steps=20)
  T_EVAL=180 T_TRAIN=90 T_FT=300
else
  EVAL_ARGS=(--model resnet20 --batch-size 32 --batches 1 --repeats 2
             --variants fp32,fake-n64,integer-n64,literal-n64)
  TRAIN_ARGS=(--batch-size 32 --repeats 3)
  FT_STEPS="${FT_STEPS:-4}"
  FT_ARGS=(--set batch_size=32 --set train_subset=256 --set test_subset=256 --set eval_batch_size=256
           --set calib_images=64 --set bn_images=64 --set time_steps=2)
  T_EVAL=300 T_TRAIN=200 T_FT=400
fi

FAILED=()
step() {  # name timeout_s cmd...
  local name=$1 t=$2; shift 2
  local s=$(date +%s)
  say ""; say "[gpu_check] $name: $*"
  timeout "$t" "$@" 2>&1 | grep -v -i -E "warning|warn\(" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "[gpu_check] $name: exit $rc after $(( $(date +%s) - s )) s"
  [ "$rc" = 0 ] || FAILED+=("$name(rc=$rc)")
}

# 1. eval throughput (FP32, fake-quant N=4/64, integer GEMM, literal per-group)
step eval "$T_EVAL" "$PY" -m benchmarks.bench_eval "${EVAL_ARGS[@]}" --out "$WORK/bench"
# 2. train-step time, quantized vs FP
step train_step "$T_TRAIN" "$PY" -m benchmarks.bench_train_step "${TRAIN_ARGS[@]}" --out "$WORK/bench"

# 3. short fine-tune: ResNet-20, exact FGQ N=64, 8-bit activations, from the published weights
INIT="${FGQ_INIT_CHECKPOINT:-}"
if [ -z "$INIT" ]; then
  SHARED="${FGQ_SHARED_DIR:-$REPO/../shared}"
  TH="$SHARED/models/cifar-resnet/resnet20-12fca82f.th"
  if [ -f "$TH" ] && "$PY" -c "import torch" 2>/dev/null; then INIT="$TH"; else INIT=None; fi
fi
[ "$INIT" = None ] && say "[gpu_check] no ResNet-20 checkpoint (set FGQ_INIT_CHECKPOINT): fine-tuning from random init, accuracies are meaningless"
INIT_SET="init_checkpoint=$INIT"
[ "$INIT" = None ] || INIT_SET="init_checkpoint='$INIT'"
step finetune "$T_FT" "$PY" -m experiments.finetune --config experiments/configs/finetune_resnet20_n64.py \
  --workdir "$WORK/ft" --results-dir "$WORK/ft_results" \
  --set name=gpu_check --set "$INIT_SET" --set epochs=1 --set "steps_per_epoch=$FT_STEPS" \
  --set warmup_epochs=0.0 --set progress=False --set export=False --set checkpoint_every=0 \
  --set fp_reference=None "${FT_ARGS[@]}"
grep -E "^\[fgq-train\]|^\[finetune\]|Error|error" "$LOG" | tail -20 > "$OUTDIR/finetune.log"

# 4. one table
TOTAL=$(( $(date +%s) - T0 ))
"$PY" - "$WORK" "$OUTDIR" "$PRESET" "$TOTAL" "${FAILED[*]:-}" <<'PYEOF' 2>&1 | tee -a "$LOG"
import glob, json, sys
from pathlib import Path
from benchmarks import common

work, out, preset, total, failed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
info = common.machine_info()
res = {}
for name in ("eval_throughput", "train_step"):
    p = work / "bench" / f"{name}.json"
    if p.is_file():
        res[name] = json.loads(p.read_text())
ft = None
js = sorted(glob.glob(str(work / "ft_results" / "**" / "finetune_gpu_check.json"), recursive=True))
if js:
    ft = json.loads(Path(js[-1]).read_text())["runs"][-1]
md = [f"## gpu_check ({preset} preset): {common.machine_line(info)}", "",
      f"- total wall {total} s; command: `bash benchmarks/gpu_check.sh` ({preset})",
      f"- failed steps: {failed or 'none'}", ""]
for name in ("eval_throughput", "train_step"):
    if name in res:
        md.append(common.result_markdown(res[name]))
if ft:
    row = {
        "model": ft["model"], "method": ft["method"], "N": ft["group_size"], "acts": ft["act_bits"],
        "steps": ft["steps"], "batch": ft["batch_size"], "fp_start_top1": ft.get("fp_start_top1"),
        "top1_start": ft["top1_start"], "top1_final": ft["top1_final"],
        "train_wall_s": ft.get("train_wall_s"), "images_per_s": ft.get("images_per_s"),
        "step_ms_quant": 1e3 * ft["step_s_quant"] if ft.get("step_s_quant") else None,
        "step_ms_fp": 1e3 * ft["step_s_fp"] if ft.get("step_s_fp") else None,
        "step_ratio": ft.get("step_time_ratio"), "n_test": ft.get("n_test"),
    }
    res["finetune"] = {"name": "finetune", "title": "Short fine-tune (experiments.finetune, finetune_resnet20_n64.py)",
                       "columns": list(row), "rows": [row],
                       "notes": [f"init_checkpoint: {ft['config'].get('init_checkpoint')}",
                                 "top-1 on the CIFAR-10-JPEG test split (n_test images); fp_start = the FP start point, "
                                 "top1_start = after PTQ (+BN re-estimation), before fine-tuning"]}
    md.append(common.result_markdown(res["finetune"]))
else:
    md.append("### Short fine-tune: no result (see gpu_check.log)\n")
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
(out / "gpu_check.json").write_text(json.dumps(common._jsonable(
    {"preset": preset, "total_s": int(total), "failed": failed.split(), "machine": info, "results": res}), indent=2) + "\n")
print("\n".join(md))
print(f"wrote {out / 'gpu_check.md'} and gpu_check.json")
PYEOF
say "[gpu_check] done in $(( $(date +%s) - T0 )) s; failed: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]

#!/usr/bin/env bash
# The one command for a GPU machine: install, the GPU tests and the benchmarks, within --budget
# (the README's "Benchmarks" says how long it took).
#
#   bash bench/gpu_run.sh [--wheels DIR] [--results-dir DIR] [--budget SECONDS] [--skip-install]
#                         [--stages LIST] [--learning-seconds S] [--learning-args "FLAGS"]
#   bash bench/gpu_run.sh --cpu-dry-run [--results-dir DIR] [--stages LIST]
#
# Stages, in order (each under `timeout`, each recorded with its status and time; a failing stage does
# not stop the later ones, the overall deadline --budget (default 480 s) does):
#   install      pip install --no-index from the wheels folder whatever the image lacks of
#                open_clip_torch (+ its pure-python deps) and nvidia-dali-cuda130 (+ deps)
#   build        the C++/CUDA extension for this GPU's arch (TORCH_CUDA_ARCH_LIST from the device):
#                pip install --no-build-isolation --no-deps --no-index -e .
#   tests        python -m pytest -m gpu
#   train-scad_mi  bench/train_step.py at ViT-B-32 (random weights), 224 px, batch 64, bf16
#   kernels      bench/kernels.py --kinds model   (fused ops at the shapes in bench/op_shapes.json)
#   train-galip  as train-scad_mi for galip
#   loader       bench/loader.py: DALI device="mixed" vs torch DataLoader images/s
#   kernels-sweep  bench/kernels.py --kinds sweep (bandwidth sweep; whatever time is left)
#   learning     (only when --stages names it; it then runs right after build) the embedded default
#                trained on the GPU: python -m scadfast.train --variant scad_mi --device cuda
#                --loader memory --steps 100000 --eval-every 500 [--learning-args], stopped by SIGTERM
#                after --learning-seconds (default 300; the trainer finishes its step, checkpoints and
#                writes summary.json, curves.jsonl/png and its last sample grid): the learning curve at
#                GPU speed. Its run folder is written to $OUT/learning when $OUT is set (so it comes
#                back from a device runner), else next to the results; the JSON embeds its curve.
# --stages LIST: comma-separated stages to run (default: all but learning); the others are recorded
# as skipped. E.g. SCADFAST_CUDA=0 bash bench/gpu_run.sh --stages install,build,learning for a learning
# run alone (SCADFAST_CUDA=0: build stage without nvcc; scad_mi uses no CUDA-extension op).
# (the most important measurements first: stages that no longer fit in the budget are skipped)
# Output: <results-dir>/<device>-<date>.json (schema scadfast.bench.gpu_run/1: the stages and every
# result JSON embedded) and <device>-<date>.log; copied to $OUT too when $OUT is set (the device
# runner returns only what is under $OUT). `python bench/report.py` turns it into tables.
#
# --cpu-dry-run: the same stages and command lines at tiny sizes on the CPU, with no install and no
# build (the dev environment must already have scadfast installed): proves the GPU run has no typo.
# Its stage limits are generous (budget 1800 s) because a shared CPU can be slow.
# Its results go to ${TMPDIR:-/tmp}/scadfast-gpu-dry-run unless --results-dir is given.
#
# Filling the wheels folder (on the dev machine, which has network; the GPU machine has none). The
# GPU image is expected to have torch/torchvision/triton and CUDA; everything else comes as wheels:
#
#   W=bench/wheels; mkdir -p "$W"
#   pip download -d "$W" --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
#       --no-deps open_clip_torch ftfy wcwidth regex tqdm timm huggingface_hub hf-xet safetensors \
#       pyyaml filelock fsspec packaging typing_extensions \
#       nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 \
#       nvidia-nvtiff-cu13 nvidia-libnvcomp-cu13 astunparse gast six optree nvtx makefun libcst wheel
#
# (match --python-version to the GPU image's Python; pin the versions of the dev venv with `==` from
# `pip freeze` to get exactly what the tests ran with). The folder is git-ignored. DALI's wheels are
# several hundred MB, more than a device runner may carry with the working tree (64 MiB): put the
# folder on the GPU machine by other means and pass --wheels; without DALI the train-* stages load
# with --loader memory (no DALI needed), the loader stage fails (recorded) and the DALI tests skip.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DRY=0
WHEELS="${SCADFAST_WHEELS:-$ROOT/bench/wheels}"
RESULTS=""
BUDGET=480
BUDGET_GIVEN=0
SKIP_INSTALL=0
SELECTED="install,build,tests,train-scad_mi,kernels,train-galip,loader,kernels-sweep"
LEARN_SECONDS=300
LEARN_EXTRA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --results-dir) RESULTS="$2"; shift ;;
    --budget) BUDGET="$2"; BUDGET_GIVEN=1; shift ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --stages) SELECTED="$2"; shift ;;
    --learning-seconds) LEARN_SECONDS="$2"; shift ;;
    --learning-args) LEARN_EXTRA="$2"; shift ;;
    -h|--help) sed -n '2,55p' "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 1 ]; then
  RESULTS="${RESULTS:-${TMPDIR:-/tmp}/scadfast-gpu-dry-run}"
  DEVICE_SLUG="cpu-dry-run"
else
  RESULTS="${RESULTS:-$ROOT/bench/results}"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_run.sh: no CUDA device visible to $PY (use --cpu-dry-run on a CPU machine)" >&2
    exit 2
  fi
  DEVICE_SLUG="$("$PY" -c "import torch; n=torch.cuda.get_device_name(0); print(''.join(c if c.isalnum() else '-' for c in n).strip('-').lower())")"
fi
STAMP="$(date -u +%Y%m%d-%H%M%S)"
NAME="${DEVICE_SLUG}-${STAMP}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/scadfast-gpu-run.XXXXXX")"
LOG="$RESULTS/$NAME.log"
STAGES="$WORK/stages.tsv"
: > "$STAGES"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export SCADFAST_CACHE="$WORK/cache"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
START=$(date +%s)
export PY WHEELS
echo "[gpu_run] $(date -u +%FT%TZ) root=$ROOT python=$PY dry_run=$DRY results=$RESULTS budget=${BUDGET}s"

# Command lines of the run; the dry run shrinks sizes only.
if [ "$DRY" = 1 ]; then
  unset TRITON_INTERPRET
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TEST_ARGS=(-m gpu -q -p no:cacheprovider tests/test_patch_hinge.py)  # collects and skips its GPU test
  KERNEL_ARGS=(--quick --device cpu --ops patch_hinge_loss --providers eager fused)
  KERNEL_SWEEP_ARGS=(--quick --device cpu --ops patch_hinge_loss --providers eager fused)
  TRAIN_ARGS=(--tiny --device cpu --warmup 0 --windows 1 --no-flops)
  LEARN_ARGS=(--device cpu --loader memory --steps 4 --eval-every 2 --eval-prompts 2 --eval-n 2 --shapes-n 48
              --batch-size 4 --ngf 16 --ndf 16 --sample-prompts 2 --sample-noise 2)
  LOADER_ARGS=(--device cpu --image-size 64 --batch-size 4 --batches 2 --warmup 1 --shapes-n 32 --workers 1)
  # Stage limits (s): generous, a shared CPU can be slow; the dry run proves the command lines, not speed.
  CAP_TESTS=300; CAP_KERNELS=300; CAP_TRAIN=400; CAP_LOADER=200; CAP_SWEEP=200
  [ "$BUDGET_GIVEN" = 1 ] || BUDGET=1800
else
  TEST_ARGS=(-m gpu -q -p no:cacheprovider)
  KERNEL_ARGS=(--device cuda)
  KERNEL_SWEEP_ARGS=(--device cuda)
  TRAIN_ARGS=(--device cuda --clip ViT-B-32 --clip-pretrained none --batch-size 64 --precision bf16 --shapes-n 1024)
  LEARN_ARGS=(--device cuda --loader memory --steps 100000 --eval-every 500)
  LOADER_ARGS=(--device cuda --image-size 224 --batch-size 64 --batches 50 --warmup 5 --shapes-n 1024)
  CAP_TESTS=60; CAP_KERNELS=120; CAP_TRAIN=120; CAP_LOADER=40; CAP_SWEEP=120
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # a system Python may be "externally managed"
fi

# stage NAME CAP_SECONDS MIN_SECONDS command...: runs under timeout min(CAP, time left); skipped
# when less than MIN_SECONDS are left.
stage() {
  local name="$1" cap="$2" need="$3"; shift 3
  local now left lim t0 rc status note
  if [[ ",$SELECTED," != *",$name,"* ]]; then
    printf '%s\tskipped\t0\t%s\n' "$name" "not in --stages" >> "$STAGES"
    return 0
  fi
  now=$(date +%s); left=$(( BUDGET - (now - START) ))
  if [ "$left" -lt "$need" ]; then
    echo "[gpu_run] --- $name: SKIPPED (${left}s left of the ${BUDGET}s budget, needs ${need}s)"
    printf '%s\tskipped\t0\t%s\n' "$name" "budget: ${left}s left" >> "$STAGES"
    return 0
  fi
  lim=$(( cap < left ? cap : left ))
  echo "[gpu_run] --- $name (limit ${lim}s): $*"
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a shell function of this script: run it in a child bash
    timeout --kill-after=10 "$lim" bash -c "$(declare -f "$1"); $*"
  else
    timeout --kill-after=10 "$lim" "$@"
  fi
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ "$rc" = 0 ]; then status=ok; note=""
  elif [ "$rc" = 124 ] && [ "$name" = learning ]; then status=ok; note="stopped by SIGTERM after ${lim}s, as designed"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; note="killed after ${lim}s"
  else status=failed; note="exit $rc"
  fi
  echo "[gpu_run] --- $name: $status in ${dt}s ${note}"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$note" >> "$STAGES"
  return 0
}

install_missing() {
  local missing=()
  "$PY" -c "import open_clip" 2>/dev/null || missing+=(open_clip_torch)
  "$PY" -c "import nvidia.dali" 2>/dev/null || missing+=(nvidia-dali-cuda130)
  if [ ${#missing[@]} = 0 ]; then echo "open_clip and DALI already installed"; return 0; fi
  if [ ! -d "$WHEELS" ]; then echo "missing ${missing[*]} and no wheels folder $WHEELS" >&2; return 3; fi
  local pkg rc=0
  for pkg in "${missing[@]}"; do  # one at a time: open_clip installs even where DALI's wheels are absent
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$pkg" || { echo "could not install $pkg" >&2; rc=3; }
  done
  return $rc
}

build_extension() {
  local arch
  if [ "${SCADFAST_CUDA:-1}" = 0 ]; then  # asked for the CPU-only extension: the quick install (e.g. a
    # learning run of scad_mi, which uses no CUDA-extension op): layout + Triton kernels, no nvcc
    echo "building scadfast._C without CUDA kernels (SCADFAST_CUDA=0)"
    SCADFAST_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 6
    "$PY" -c "import scadfast.kernels, scadfast._C"
    return
  fi
  arch="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")" || return 4
  echo "building scadfast._C for sm_${arch/./}"
  if ! TORCH_CUDA_ARCH_LIST="$arch" SCADFAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .; then
    # No CUDA toolkit (or a failed nvcc build): install with the CPU-only extension so that the package
    # layout (scadfast.kernels = kernels/) and the Triton kernels still work; the stage stays failed.
    echo "CUDA build failed; installing with the CPU-only extension instead" >&2
    SCADFAST_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || true
    return 6
  fi
  "$PY" -c "from scadfast.ops import _impl; import sys; ok=_impl.extension_available(cuda=True); print('extension with CUDA kernels:', ok, _impl.extension_error() or ''); sys.exit(0 if ok else 5)"
}

if [ "$DRY" = 1 ] || [ "$SKIP_INSTALL" = 1 ]; then
  printf 'install\tskipped\t0\t%s\n' "$([ "$DRY" = 1 ] && echo dry run || echo --skip-install)" >> "$STAGES"
  printf 'build\tskipped\t0\t%s\n' "$([ "$DRY" = 1 ] && echo dry run || echo --skip-install)" >> "$STAGES"
else
  stage install 120 10 install_missing
  stage build 240 30 build_extension
fi

# Without DALI (its wheels are more than a device runner may carry) the training stages load their data
# with --loader memory: the same batches, each image decoded once by Pillow and kept on the GPU.
if ! "$PY" -c "import nvidia.dali" 2>/dev/null; then
  TRAIN_ARGS+=(--loader memory)
  echo "[gpu_run] no DALI: the train-* stages use --loader memory"
fi
if [ -n "${OUT:-}" ]; then LEARN_OUT="$OUT/learning"; else LEARN_OUT="$RESULTS/$NAME-learning"; fi
# shellcheck disable=SC2206  # --learning-args is a flag string, split on spaces
stage learning "$LEARN_SECONDS" 60 "$PY" -m scadfast.train --variant scad_mi "${LEARN_ARGS[@]}" $LEARN_EXTRA --out "$LEARN_OUT"
stage tests "$CAP_TESTS" 10 "$PY" -m pytest "${TEST_ARGS[@]}"
stage train-scad_mi "$CAP_TRAIN" 40 "$PY" bench/train_step.py --variant scad_mi "${TRAIN_ARGS[@]}" --out "$WORK/train_step-scad_mi.json"
stage kernels "$CAP_KERNELS" 20 "$PY" bench/kernels.py --kinds model "${KERNEL_ARGS[@]}" --out "$WORK/kernels-model.json"
stage train-galip "$CAP_TRAIN" 40 "$PY" bench/train_step.py --variant galip "${TRAIN_ARGS[@]}" --out "$WORK/train_step-galip.json"
stage loader "$CAP_LOADER" 15 "$PY" bench/loader.py "${LOADER_ARGS[@]}" --out "$WORK/loader.json"
stage kernels-sweep "$CAP_SWEEP" 30 "$PY" bench/kernels.py --kinds sweep "${KERNEL_SWEEP_ARGS[@]}" --out "$WORK/kernels-sweep.json"

# One results file: the stages and every result JSON (complete or partial) embedded.
OUTFILE="$RESULTS/$NAME.json"
"$PY" - "$STAGES" "$WORK" "$OUTFILE" "$DRY" "$START" "$LEARN_OUT" <<'EOF'
import json, os, sys, time
stages_tsv, work, out, dry, start = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
learn_out = sys.argv[6]
sys.path.insert(0, os.path.join(os.getcwd(), "bench"))
import torch
import common
stages = []
for line in open(stages_tsv):
    name, status, secs, note = (line.rstrip("\n").split("\t") + ["", "", "", ""])[:4]
    stages.append({"name": name, "status": status, "seconds": float(secs or 0), "note": note})
results = []
for fn in ("kernels-model.json", "train_step-scad_mi.json", "train_step-galip.json", "loader.json", "kernels-sweep.json"):
    p = os.path.join(work, fn)
    if os.path.isfile(p):
        try:
            results.append(json.load(open(p)))
        except json.JSONDecodeError as e:
            stages.append({"name": fn, "status": "unreadable", "seconds": 0, "note": str(e)[:200]})
device = torch.device("cpu" if dry else "cuda")
res = {"schema": "scadfast.bench.gpu_run/1", **common.environment(device), "dry_run": dry,
       "command": "bash bench/gpu_run.sh" + (" --cpu-dry-run" if dry else ""),
       "wall_s": time.time() - start, "stages": stages, "results": results,
       "ok": all(s["status"] in ("ok", "skipped") for s in stages)}
if os.path.isfile(os.path.join(learn_out, "curves.jsonl")):  # the learning stage's curve and summary
    from scadfast.metrics.curves import read_jsonl
    summary = os.path.join(learn_out, "summary.json")
    res["learning"] = {"run_dir": learn_out, "curve": read_jsonl(os.path.join(learn_out, "curves.jsonl")),
                       "summary": json.load(open(summary)) if os.path.isfile(summary) else None}
with open(out, "w") as f:
    json.dump(res, f, indent=1, default=str)
print(f"[gpu_run] wrote {out}: " + ", ".join(f"{s['name']}={s['status']}" for s in stages))
EOF
RC=$?
echo "[gpu_run] done in $(( $(date +%s) - START ))s; log $LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$OUTFILE" "$LOG" "$OUT"/ 2>/dev/null || true
fi
FAILED=0
grep -q -E "$(printf '\t')(failed|timeout)$(printf '\t')" "$STAGES" && FAILED=1
rm -rf "$WORK"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
if [ "$RC" != 0 ]; then exit "$RC"; fi
exit "$FAILED"

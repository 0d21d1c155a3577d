#!/usr/bin/env bash
# One call on a GPU machine: `hpo bench` and the reference anchors (gpu_limit.py) side by side,
# on the same GPU, in the same run. Results land in $OUT (default: ./gpu-check-out).
#
#   benchmarks/gpu_check.sh DATA_DIR                          # hpo bench --device cuda:0 + anchors
#   benchmarks/gpu_check.sh DATA_DIR --device cpu --quick     # dry run on a CPU (anchors skipped)
#
# DATA_DIR holds the four Fashion-MNIST IDX files (gz or not), e.g. /usr/share/datasets/fashion-mnist.
# Further arguments go to `hpo bench` (default: --device cuda:0). The anchors are looked for in
# $ANCHORS, else shared/anchors, else ../shared/anchors; they need CUDA and are skipped otherwise.
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR [hpo bench options, default --device cuda:0]" >&2
  exit 2
fi
DATA_DIR=$1
shift
BENCH_ARGS=("$@")
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--device cuda:0)
PYTHON=${PYTHON:-python}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "== machine"
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv 2>/dev/null || echo "nvidia-smi: none"
  "$PYTHON" -c "import torch, optuna; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| optuna', optuna.__version__)"
  git -C "$REPO" rev-parse --short HEAD 2>/dev/null || true
  uptime
} 2>&1 | tee "$OUT/machine.txt"

echo "== hpo bench ${BENCH_ARGS[*]} --data-dir $DATA_DIR"
status=0
"$PYTHON" -m hpo.cli bench "${BENCH_ARGS[@]}" --data-dir "$DATA_DIR" --json "$OUT/bench.json" \
  2> >(tee "$OUT/bench.log" >&2) | tee "$OUT/bench.txt" || status=$?

ANCHORS=${ANCHORS:-}
for candidate in "$ANCHORS" "$REPO/shared/anchors" "$REPO/../shared/anchors"; do
  if [ -n "$candidate" ] && [ -f "$candidate/gpu_limit.py" ]; then ANCHORS=$candidate; break; fi
done
if [ -z "$ANCHORS" ] || [ ! -f "$ANCHORS/gpu_limit.py" ]; then
  echo "== anchors: gpu_limit.py not found (set ANCHORS=DIR); skipped" | tee "$OUT/anchors.txt"
elif ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== anchors: $ANCHORS/gpu_limit.py needs CUDA; skipped on this machine" | tee "$OUT/anchors.txt"
else
  echo "== anchors: $ANCHORS/gpu_limit.py"
  # The anchors read a torchvision root with the files uncompressed.
  ROOT=$(mktemp -d)
  mkdir -p "$ROOT/FashionMNIST/raw"
  for f in "$DATA_DIR"/*-ubyte*; do
    case $f in
      *.gz) gunzip -c "$f" > "$ROOT/FashionMNIST/raw/$(basename "$f" .gz)" ;;
      *) cp "$f" "$ROOT/FashionMNIST/raw/" ;;
    esac
  done
  (cd "$ANCHORS" && OUT="$OUT" "$PYTHON" gpu_limit.py "$ROOT") 2>&1 | tee "$OUT/anchors.txt" || status=$?
  rm -rf "$ROOT"
fi

echo "== side by side"
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/side_by_side.txt"
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
bench = json.loads((out / "bench.json").read_text()) if (out / "bench.json").exists() else {"rows": []}
rows = {r["name"]: r for r in bench["rows"]}
anchor = json.loads((out / "gpu_limit.json").read_text()) if (out / "gpu_limit.json").exists() else {}

def steady(times):
    return statistics.median(times[1:] or times) if times else None

def show(what, ours, theirs, unit):
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
    print(f"{what:<48} hpo {fmt(ours):>8}  anchor {fmt(theirs):>8} {unit:<16} hpo/anchor {ratio}")

graph = rows.get("hpo trainer, graph", {})
show("one model, step in a CUDA graph", graph.get("s_per_epoch"), steady(anchor.get("E_graph_bs64_epoch_s")),
     "s/epoch")
stacked = rows.get("10 folds, stacked", {})
f = steady(anchor.get("F_graph_vmap10_bs64_epoch_s"))
show("10 models stacked, step in one CUDA graph", stacked.get("model_epochs_per_s"), 10 / f if f else None,
     "model-epochs/s")
print(f"hpo bench problems: {bench.get('problems', 'no bench.json')}")
EOF
exit $status

#!/usr/bin/env bash
# The GPU checks of dpdiff, as one prepared script (a GPU machine is lent rarely and briefly: it must just run).
#
#   bash benchmarks/gpu_check.sh download   # here, with PyPI: wheels for what a bare GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh            # on the GPU machine (no network): install them offline, then run
#
# The GPU image is assumed to hold python3 with a CUDA torch (and numpy, scipy, transformers, safetensors,
# accelerate, ...); only the packages whose import fails there are installed, from .whl/ (never committed:
# .whl/ is ignored), into /tmp/site. Then, within about 8 minutes on one GPU:
#   1. the engine tests on CUDA, the CUDA-only one included (clipping in IEEE fp32 with TF32 enabled by the
#      user: no clipped unit above C), and the family tests;
#   2. the SD-1.5-shape step benchmark: DP / non-DP step time and peak memory, LoRA (hooks) and full
#      fine-tuning (book-keeping), 16x16 and 64x64 latents.
# Results go to $OUT when it is set (the device tool brings them back), else benchmarks/results/gpu/:
# gpu_check.log, pytest.txt, step.jsonl. Commit them with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl
# import name = distribution name on PyPI (the versions come from constraints.txt)
NEEDED="diffusers=diffusers peft=peft opacus=opacus hydra=hydra-core omegaconf=omegaconf antlr4=antlr4-python3-runtime
dp_accounting=dp-accounting imagehash=ImageHash pywt=PyWavelets skimage=scikit-image lazy_loader=lazy-loader
tifffile=tifffile imageio=imageio networkx=networkx pytest=pytest pluggy=pluggy iniconfig=iniconfig
xdist=pytest-xdist execnet=execnet hypothesis=hypothesis sortedcontainers=sortedcontainers tree=dm-tree
absl=absl-py mpmath=mpmath attr=attrs sklearn=scikit-learn threadpoolctl=threadpoolctl joblib=joblib
matplotlib=matplotlib psutil=psutil"

pin() {  # the pinned version of a distribution in constraints.txt ("" if unpinned)
  grep -i -E "^$1==" constraints.txt | head -1 | cut -d= -f3
}

if [ "${1:-}" = "download" ]; then
  mkdir -p "$WHL"
  grep -qxF "/$WHL/" .git/info/exclude 2>/dev/null || echo "/$WHL/" >> .git/info/exclude
  for pair in $NEEDED; do
    dist=${pair#*=}
    v=$(pin "$dist")
    spec=$dist${v:+==$v}
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$WHL" "$spec" 2>/dev/null \
      || $PY -m pip download --quiet --no-deps --no-binary=:all: -d "$WHL" "$spec" \
      || echo "could not download $spec"  # antlr4-python3-runtime exists as an sdist only
  done
  du -sh "$WHL"
  exit 0
fi

OUTDIR=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

missing=""
for pair in $NEEDED; do
  mod=${pair%%=*}; dist=${pair#*=}
  $PY -c "import $mod" 2>/dev/null || missing="$missing $dist"
done
if [ -n "$missing" ]; then
  echo "installing from $WHL:$missing"
  files=""
  for dist in $missing; do
    norm=$(echo "$dist" | tr '-' '_')
    f=$(ls "$WHL"/*.whl "$WHL"/*.tar.gz 2>/dev/null | grep -i -E "/(${dist}|${norm})-[0-9]" | head -1)
    [ -n "$f" ] && files="$files $f" || echo "no wheel for $dist in $WHL (run: bash benchmarks/gpu_check.sh download)"
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site $files || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

$PY - <<'EOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: gpu_check.sh needs a GPU"
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
EOF

echo "== 1. engine and family tests on CUDA"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/privacy/test_engine.py tests/models -x \
  -k "not slow" 2>&1 | tee "$OUTDIR/pytest.txt" | tail -25
echo "== 2. SD-1.5-shape step benchmark (DP / non-DP)"
: > "$OUTDIR/step.jsonl"
for cfg in "lora hooks 8 8 16" "full bookkeeping 8 4 16" "lora hooks 4 4 64" "full bookkeeping 2 2 64"; do
  set -- $cfg
  for mode in nondp dp; do
    timeout 120 $PY benchmarks/bench_step.py --model sd15 --adapter "$1" --engine "$2" --mode "$mode" \
      --batch "$3" --micro "$4" --resolution "$5" --steps 4 --device cuda | tail -1 | tee -a "$OUTDIR/step.jsonl"
  done
done
$PY - "$OUTDIR/step.jsonl" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip().startswith("{")]
key = lambda r: (r.get("adapter"), r.get("resolution"), r.get("batch"))
base = {key(r): r for r in rows if r.get("mode") == "nondp"}
for r in rows:
    if r.get("mode") == "dp" and key(r) in base and base[key(r)].get("step_seconds"):
        b = base[key(r)]
        print(f"{r.get('adapter')} @{r.get('resolution')} batch {r.get('batch')}: DP/non-DP step time "
              f"{r['step_seconds'] / b['step_seconds']:.2f}, peak memory {r.get('peak_mib', 0) / max(b.get('peak_mib', 1), 1):.2f}")
EOF
echo "done: $OUTDIR"

#!/usr/bin/env bash
# Run on the lent GPU machine (device tool, repository root, carry .whl and .carry; see bundle.sh):
#   bash .ci/gpu/run.sh <experiment|all> [extra nextlocmoe options, e.g. --set train.epochs=3]
# The gpu profile with the carried compact backbone and CSV; results and the small job records go to $OUT
# (results/, runs/ without checkpoints), so that the next call can carry them back and reuse finished jobs.
set -euo pipefail
OUT=${OUT:?"OUT must name the output folder (the device tool sets it)"}
SITE="$PWD/.gpu-site"     # the carried wheels, installed inside the (git-ignored) tree copy
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD"
export NEXTLOCMOE_GIT_SHA="$(cat .carry/GIT_SHA 2>/dev/null || echo unknown)"
what=${1:-all}; shift || true
mkdir -p "$OUT/results"
python3 -m nextlocmoe.cli run "$what" --profile gpu \
    --set model.backbone=compact:.carry/smollm2-12 --set data.path=.carry/Foursquare_Sample.csv \
    --results "$OUT/results" --runs runs/experiments "$@"
# job records and model summaries (no checkpoints: they exceed what can travel back and forth)
python3 - "$OUT/runs" <<'PY'
import shutil, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in Path("runs/experiments").rglob("*"):
    if f.is_file() and f.suffix in (".json", ".csv", ".yaml"):
        (out / f.relative_to("runs/experiments")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / f.relative_to("runs/experiments"))
PY

#!/usr/bin/env bash
# Prepare what the lent GPU machine cannot install or download (run here, from the repository root):
#   .whl/    wheels its image lacks (pytorch-tcn), for its Python 3.12
#   .carry/  the compact SmolLM2 export (first 12 layers + the fixed texts' embedding rows, ~27 MB) and a copy
#            of the New York check-ins CSV (7.7 MB) that the mat-data package ships
# Both paths are git-ignored; pass them to the device tool as `carry: [".whl", ".carry"]` (64 MiB in all).
set -euo pipefail
PY=${PY:-.venv/bin/python}
mkdir -p .whl .carry
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl pytorch-tcn==1.2.3
"$PY" - <<'PY'
import shutil
from pathlib import Path

from nextlocmoe.data.sources import nyc_sample_path
from nextlocmoe.model.compact import export_compact, is_compact_dir

if not is_compact_dir(".carry/smollm2-12"):
    export_compact(".carry/smollm2-12", num_layers=12)
if not Path(".carry/Foursquare_Sample.csv").is_file():
    shutil.copy(nyc_sample_path(), ".carry/Foursquare_Sample.csv")
PY
# the commit these files belong to (the device copy of the tree has no .git)
git rev-parse HEAD | tr -d '\n' > .carry/GIT_SHA
git diff --quiet HEAD || printf -- '-dirty' >> .carry/GIT_SHA
du -sh .whl .carry

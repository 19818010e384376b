#!/usr/bin/env bash
# A chunk of the long training runs on a lent GPU (the workplace's `device` tool), in three
# steps, each from the repository root:
#
#   bash scripts/gpu-chunk.sh prepare study|3d   # here: what the chunk needs, in .gpu/
#   bash scripts/gpu-chunk.sh run MINUTES study|3d   # there (device run, carry [".gpu"])
#   bash scripts/gpu-chunk.sh restore DIR        # here: the states that came back in DIR
#
# Why the preparation: the device machine gets the tracked tree (at most 64 MiB) and has
# no network, no ranreg dependencies beyond its own torch stack and no ../shared. `prepare`
# leaves in the index only the kept states that the chunk trains (the others are
# un-indexed and ignored until `restore`; the files stay on disk), and puts the shared
# data and the nibabel/monai wheels in .gpu/ (ignored). `run` trains every run of the
# bundle at once on the one GPU (3d: configs/ran3-synth.yaml and ran4p-synth.yaml, bf16
# autocast; study: the 10 runs of benchmarks/study_2d.py to the next cycle end, float32,
# TF32 off), each stopping after MINUTES with its state, and packs the states into $OUT in
# parts under the tool's 16 MiB per file. `restore` puts the index back and unpacks.
# Measured 2026-12-04 on one H200 (docs/training.md): RAN3 0.115 s and RAN4+ 0.177 s per
# step, 2D RAN4+ 0.09 s, all sharing the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}  # cpu: a dry run of the same steps
PY=${PY:-python3}  # the machine's Python with torch
EXCLUDE=.git/info/exclude
MARK="# gpu-chunk"

states_of() {  # the kept states a bundle trains
    case "$1" in
        3d) echo training-state/ran3-synth training-state/ran4p-synth ;;
        study) echo training-state/study-2d ;;
        *) echo "error: bundle must be study or 3d, got '$1'" >&2; exit 2 ;;
    esac
}

limit() {  # seconds for `timeout`: MINUTES of training plus a margin for loading and saving
    awk -v m="$1" -v extra="$2" 'BEGIN { print int(60 * m + extra) }'
}

prepare() {
    local keep other
    keep=$(states_of "$1")
    echo "$MARK begin" >>"$EXCLUDE"
    for other in training-state/*; do
        case " $keep " in *" $other "*) continue ;; esac
        git rm -r -q --cached "$other"
        echo "/$other/" >>"$EXCLUDE"
    done
    printf '/.gpu/\n%s end\n' "$MARK" >>"$EXCLUDE"
    mkdir -p .gpu/shared .gpu/whl
    cp -r ../shared/data/abdomen-ct-labels .gpu/shared/
    [ "$1" = study ] || cp -r ../shared/data/real-scans .gpu/shared/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .gpu/whl \
        nibabel==5.4.2 monai==1.6.1
    git ls-files -z | du -ch --files0-from=- | tail -1
    du -sh .gpu
}

run_study() {  # every run to its next cycle end, one process each
    local minutes=$1 plan steps runs model seed
    plan=$("$PY" - <<'EOF'  # cut the planes once; the target step and the runs, from the study
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from study_2d import SEEDS, STEPS, run_name, runs_of, trained_steps
from study_2d_data import load_split
for split in ("train", "val"):
    load_split(split, Path("runs/study-2d/data"))
runs = runs_of(tuple(SEEDS))
done = min(trained_steps(Path("training-state/study-2d") / run_name(*r)) for r in runs)
print((done // STEPS + 1) * STEPS)
print("\n".join(f"{model} {seed}" for model, seed in runs))
EOF
)
    steps=$(head -n 1 <<<"$plan")
    runs=$(tail -n +2 <<<"$plan")
    [ -z "${STUDY_RUNS:-}" ] || runs=$(tr , '\n' <<<"$STUDY_RUNS")  # a dry run's subset
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    export STUDY_2D_COMMAND="bash scripts/gpu-chunk.sh run $minutes study (to step $steps)"
    while read -r model seed; do
        timeout "$(limit "$minutes" 240)" "$PY" benchmarks/study_2d.py --worker "$model" "$seed" \
            --steps "$steps" --state training-state/study-2d --work runs/study-2d \
            --time-limit "$minutes" --device "$DEVICE" \
            >"$OUT/log/study-${model//+/p}-$seed.log" 2>&1 &
    done <<<"$runs"
    wait
}

run_3d() {
    local minutes=$1 name
    export OMP_NUM_THREADS=2
    for name in ran3-synth ran4p-synth; do
        timeout "$(limit "$minutes" 300)" "$PY" -m ranreg.cli train --config "configs/$name.yaml" \
            --out "runs/$name" --state "training-state/$name" --time-limit "$minutes" \
            --no-progress --device "$DEVICE" --num-workers 4 >"$OUT/log/$name.log" 2>&1 &
    done
    wait
}

run() {
    local minutes=$1 bundle=$2
    states_of "$bundle" >/dev/null
    export PYTHONUNBUFFERED=1
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src
    mkdir -p ../shared/data "$OUT/log"
    cp -r .gpu/shared/* ../shared/data/
    [ "$DEVICE" = cpu ] || nvidia-smi -L
    "run_$bundle" "$minutes"
    # shellcheck disable=SC2046
    tar czf - $(states_of "$bundle") | split -b 15m -d - "$OUT/states.tgz.part"
    tar czf "$OUT/logs.tgz" -C "$OUT" log && rm -r "$OUT/log"
    ls -la "$OUT"
}

restore() {
    local dir=$1
    git reset -q
    sed -i "/^$MARK begin\$/,/^$MARK end\$/d" "$EXCLUDE"
    cat "$dir"/states.tgz.part* | tar xzf -
    mkdir -p runs/gpu-chunk && tar xzf "$dir/logs.tgz" -C runs/gpu-chunk
    rm -rf .gpu
    git status --short | head -20
}

case "${1:-}" in
    prepare) prepare "${2:?study or 3d}" ;;
    run) run "${2:?minutes}" "${3:?study or 3d}" ;;
    restore) restore "${2:?the folder the files came back to}" ;;
    *) echo "error: usage: $0 prepare study|3d | run MINUTES study|3d | restore DIR" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The shipped weights' 10,000-sample FID rows that two CPU cores need 6-12 hours each for (both samplers at 1000
# steps), sized for a 15-minute GPU lease: on an H100 about 4 minutes for each 1000-step row at batch 2000 (the
# three-stage weights' curve, README *FID against steps*).
#
#   bash benchmarks/gpu_lease.sh prepare         here: the wheels the GPU image lacks (into .whl/) and Fashion-MNIST's
#                                                test split (into .fmnist/), both gitignored; about 12 MB to carry
#   bash benchmarks/gpu_lease.sh curve STEPS.. -- ETAS..
#                                                there (device run, carry [".whl", ".fmnist"]), e.g.
#                                                `curve 1000 -- 1` (about 4 minutes), then `curve 1000 -- 0`
#
# `curve` writes the results file, with the rows already measured, under $OUT (rewritten after every row, so a
# run stopped at its time limit still brings back the rows it finished) and the plot beside it. Copy both over
# benchmarks/results/ after each call, before the next: a call starts from the working tree's results file (the
# device empties $OUT between calls), so the second call then keeps the first one's rows. Commit at the end.
# The rows record device "cuda": a GPU's FID equals the CPU's for the same weights and seeds (9.11 against 9.12, README).
#
# The LEASE_* variables exist for the test that runs `curve` on the CPU at a few samples (tests/test_evaluation.py), so
# that a lease is not the first run of this script; a lease leaves them unset.
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${LEASE_RESULTS:-benchmarks/results/fid-cpu-10k-ft15.json}
BUNDLE=${LEASE_BUNDLE:-/tmp/ft15-bundle}  # the --model every row of $RESULTS was measured with (--resume wants the same setup)
NUM_SAMPLES=${LEASE_NUM_SAMPLES:-10000}
BATCH_SIZE=${LEASE_BATCH_SIZE:-2000}
DATA=${LEASE_DATA:-.fmnist}
COMPARE=${LEASE_COMPARE-three-stage weights (H100)=benchmarks/results/fid-h100-10k-ft5000.json}  # empty: no dashed lines

case "${1:-}" in
prepare)
    rm -rf .whl .fmnist && mkdir -p .whl .fmnist
    # pure-Python wheels at the versions CI tests with; the image has torch, torchmetrics, pyarrow, pandas, ...
    # (device KINDS.md); importlib_metadata 10 would need lazy-importer, which it lacks, and Python 3.12 needs neither.
    # datasets 5.2 wants pyarrow>=24 and fsspec<=2026.9.0: `curve` prints the image's versions first; if they are off,
    # add their cp312 manylinux wheels here (pyarrow's is about 42 MB, inside the 64 MiB a call carries)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 "importlib_metadata<10"
    cp /usr/share/datasets/fashion-mnist/t10k-* .fmnist/
    du -sh .whl .fmnist
    ;;
curve)
    shift
    steps=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do steps+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    etas=("$@")
    if [ ${#steps[@]} -eq 0 ] || [ ${#etas[@]} -eq 0 ]; then
        echo "usage: $0 curve STEPS.. -- ETAS..   (e.g. curve 1000 -- 1)" >&2; exit 2
    fi
    [ -d "$DATA" ] || { echo "$DATA/ is missing: run '$0 prepare' here and carry .fmnist and .whl" >&2; exit 2; }
    # find_spec, not import: importing diffusers alone takes seconds, and this only asks whether it is there
    if ! python3 -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('diffusers') and u.find_spec('datasets')))"; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|diffusers|datasets|pyarrow|fsspec|torchmetrics) " || true
    out=${OUT:-outputs/lease}
    mkdir -p "$out"
    rm -rf "$BUNDLE" && cp -r models/ddpm-fashion-mnist "$BUNDLE"
    # the rows measured so far, so that --resume skips them (none yet: the file starts with this call's rows)
    if [ ! -f "$out/$(basename "$RESULTS")" ] && [ -f "$RESULTS" ]; then cp "$RESULTS" "$out/"; fi
    python3 -m training.evaluate --model "$BUNDLE" --num-samples "$NUM_SAMPLES" --batch-size "$BATCH_SIZE" --resume \
        --steps "${steps[@]}" --eta "${etas[@]}" --dataset-name "$DATA" \
        --out "$out/$(basename "$RESULTS")" --plot "$out/fid_vs_steps_10k_ft15.png" ${COMPARE:+--compare "$COMPARE"}
    ;;
*)
    echo "usage: $0 prepare | curve STEPS.. -- ETAS.." >&2; exit 2
    ;;
esac

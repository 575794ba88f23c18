"""How much the real-vs-real FID floor moves with the train subset it is measured on.

    python benchmarks/floor_spread.py --num-samples 10000 --seeds 0 10000 1 2 3 4 5 6 7 8 \
        --out benchmarks/results/floor-spread-cpu-10k.json

`training.evaluate --floor --seed S` compares one random train subset (drawn with seed S + 1) with the
reference split; a ratio "FID / floor" inherits that one subset's luck. This script measures the floor
exactly as evaluate does, for each evaluate seed given, against one reference, and reports the spread:
what a target stated as a multiple of the floor can and cannot resolve. No model is involved.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.atomic_files import write_json_atomically  # noqa: E402
from training.evaluate import floor_images, load_extractor, reference_metrics, score_images  # noqa: E402


def floors(num_samples: int, seeds, device, extractor_name: str = "offline", balanced: bool = False) -> list:
    """One row per evaluate seed: the FID and KID of its train subset against the test split (fed once);
    `balanced`: each subset holds the same number of each class."""
    extractor = load_extractor(extractor_name, device)
    fid, kid = reference_metrics(extractor, num_samples, 0, device, "test")
    rows = []
    for seed in seeds:
        real = floor_images("test", num_samples, seed, device, balanced=balanced)
        rows.append({"evaluate_seed": seed, **score_images(fid, kid, real, extractor, real=True)})
        print(f"evaluate --seed {seed}: floor FID {rows[-1]['fid']:.3f}  KID {rows[-1]['kid']:.3f}", flush=True)
    return rows


def summary(rows: list) -> dict:
    values = [row["fid"] for row in rows]
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=10000, help="train images per subset (as evaluate's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                        help="evaluate --seed values whose floors to measure")
    parser.add_argument("--extractor", default="offline", choices=["offline", "inception"])
    parser.add_argument("--balanced", action="store_true",
                        help="draw each subset with the same number of each class (as the samples and the test split have)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the rows and their summary")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds repeats a seed: each seed is one subset, give each once.")
    try:
        rows = floors(args.num_samples, args.seeds, torch.device(args.device), args.extractor, args.balanced)
    except ValueError as error:  # a balanced draw the classes do not divide
        parser.error(str(error))
    result = {"setup": {"extractor": args.extractor, "reference": "fashion-mnist test (10000 images)",
                        "num_samples": args.num_samples, "subset": "train, drawn as evaluate --floor --seed S does"
                        + (", the same number of each class" if args.balanced else "")},
              "floors": rows, "fid": summary(rows)}
    spread = result["fid"]
    print(f"floor FID over {len(rows)} subsets: mean {spread['mean']:.3f}, stdev {spread['stdev']:.3f}, "
          f"range {spread['min']:.3f}..{spread['max']:.3f}")
    if args.out:
        write_json_atomically(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

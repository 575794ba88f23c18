"""The per-class table of one or more fid_by_class.py results, read back from their JSON (no sampling).

    python benchmarks/fid_by_class_table.py benchmarks/results/fid-by-class-cpu-10k-ft15.json \
        benchmarks/results/fid-by-class-cpu-10k-sde-ft15.json

One markdown row a class: its floor's FID, then for each run of each file the FID, its ratio to the class's own
floor, the mean term, and what the pixels say: the garment's gray level, its area (share of pixels over 15 gray
levels) and its *ink*, the gray levels summed over the garment's pixels per pixel of image (area times gray, so it
needs no new field), beside the test images'. Gray and area each split a deficit of ink their own way: a sampler
can draw garments too dark at the right size or the right brightness too small, and the ink column shows whether
either way the total is short. The files should share a floor (same --num-samples and --seed); the first file's is
shown, and a file whose floor differs is refused.
"""

import argparse
import json
import sys


def garment_ink(stats: dict) -> float:
    """Gray levels summed over the garment's pixels, per pixel of image: area x mean gray (pixel_statistics)."""
    return stats["garment_area"] * stats["garment_gray"]


def percent_off(ink: float, test_ink: float) -> str:
    return f"{100 * (ink / test_ink - 1):+.1f}%"


def mean_ink(rows: list, key: str) -> float:
    """Over all classes: each class holds the same number of images (test, floor and samples alike), so the mean
    of the class means is the mean over the images."""
    return sum(garment_ink(row[key]) for row in rows) / len(rows)


def runs_of(paths) -> tuple:
    """(floor classes, [(label, run classes), ...]) from fid_by_class.py results files sharing one floor."""
    floor, runs = None, []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        if floor is None:
            floor = results["floor"]
        elif results["floor"]["all"] != floor["all"]:
            raise SystemExit(f"{path} has another floor than {paths[0]} (a different --num-samples or --seed): "
                             "tabulate them separately.")
        spacing = results["setup"]["scheduler"]["timestep_spacing"]
        runs += [(f"{run['sampler']}-{run['steps']} {spacing}", run) for run in results["runs"]]
    return floor, runs


def table(floor: dict, runs: list) -> list:
    """The markdown lines: a header, then one row a class and one for all classes together."""
    header = ["class", "floor FID", "floor ink vs test"]
    for label, _ in runs:
        header += [f"{label} FID (mean term)", "x floor", "gray / area / ink", "ink vs test"]
    header += ["test gray / area / ink"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(floor["classes"]):
        test, floor_fid = row["test"], row["floor"]["fid"]
        cells = [row["name"], f"{floor_fid:.2f}", percent_off(garment_ink(row["floor"]), garment_ink(test))]
        for _, run in runs:
            samples = run["classes"][i]["samples"]
            cells += [f"{samples['fid']:.2f} ({samples['mean_term']:.2f})", f"{samples['fid'] / floor_fid:.2f}x",
                      f"{samples['garment_gray']:.1f} / {samples['garment_area']:.3f} / {garment_ink(samples):.1f}",
                      percent_off(garment_ink(samples), garment_ink(test))]
        cells.append(f"{test['garment_gray']:.1f} / {test['garment_area']:.3f} / {garment_ink(test):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    floor_all = floor["all"]["floor"]["fid"]
    test_ink = mean_ink(floor["classes"], "test")
    cells = ["all", f"{floor_all:.2f}", percent_off(mean_ink(floor["classes"], "floor"), test_ink)]
    for _, run in runs:
        overall, ink = run["all"]["samples"], mean_ink(run["classes"], "samples")
        cells += [f"{overall['fid']:.2f} ({overall['mean_term']:.2f})", f"{overall['fid'] / floor_all:.2f}x",
                  f"ink {ink:.1f}", percent_off(ink, test_ink)]
    cells.append(f"ink {test_ink:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="fid_by_class.py --out files")
    args = parser.parse_args(argv)
    print("\n".join(table(*runs_of(args.results))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A training run's logged loss and gradient norm, from its TensorBoard logs, as JSON and a picture.

    python benchmarks/plot_training_loss.py OUTPUT_DIR/logs --window-images 25600 \
        --out benchmarks/results/loss-h100-v64-lr5e-4.json --plot benchmarks/results/loss-h100-v64-lr5e-4.png
    python benchmarks/plot_training_loss.py benchmarks/results/loss-h100-v64-lr5e-4.json --plot loss.png

Each logged loss is the mean over one logging window (--logging_steps optimizer steps times the
global batch: --window-images); the spikes that `training/loss_spikes.py` warns about are marked.
A JSON written by --out can be given instead of the logs, to re-draw a run whose logs are gone.
Runs trained before the window fix logged the last step's loss alone: their window is one global batch.
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.atomic_files import write_json_atomically  # noqa: E402
from training.loss_spikes import LossSpikeMonitor  # noqa: E402


def read_scalars(log_dir: str) -> dict:
    """{tag: [(step, value), ...]} from every TensorBoard event file under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))
    if not files:
        raise SystemExit(f"No TensorBoard event files under {log_dir}: pass the run's logs folder (OUTPUT_DIR/logs).")
    scalars = {}
    for path in files:
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(dict(rows).items()) for tag, rows in scalars.items()}  # a resumed run logs some steps twice


def record_from_logs(log_dir: str, window_images: int) -> dict:
    scalars = read_scalars(log_dir)
    if "train/loss" not in scalars:
        raise SystemExit(f"{log_dir} has no train/loss scalar; tags: {sorted(scalars)}")
    grad = scalars.get("train/grad_norm", [])
    return {"log_dir": log_dir, "window_images": window_images, "step": [s for s, _ in scalars["train/loss"]],
            "loss": [v for _, v in scalars["train/loss"]], "grad_norm_step": [s for s, _ in grad],
            "grad_norm": [v for _, v in grad], "fid": scalars.get("eval/fid", [])}


def mark_spikes(record: dict) -> list:
    """The (step, loss) pairs the training loop's spike monitor would have warned about."""
    monitor = LossSpikeMonitor()
    return [(s, x) for s, x in zip(record["step"], record["loss"]) if monitor.update(x, record["window_images"])]


def draw(record: dict, spiked: list, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    top.plot(record["step"], record["loss"], lw=1, label=f"loss (mean of {record['window_images']:,} images)")
    top.scatter([s for s, _ in spiked], [x for _, x in spiked], color="red", s=12, zorder=3, label="spike")
    top.set_ylabel("loss")
    top.legend(loc="upper right")
    if record["grad_norm"]:
        # older JSONs logged grad norms at the loss steps and kept no steps of their own
        bottom.plot(record.get("grad_norm_step") or record["step"], record["grad_norm"], lw=1, color="gray")
    bottom.set_ylabel("grad norm, logged step\n(before clipping)")
    bottom.set_xlabel("optimizer step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run's logs folder (OUTPUT_DIR/logs), or a JSON written by --out")
    parser.add_argument("--window-images", type=int, default=None,
                        help="images per logged loss (logging_steps x global batch); needed with a logs folder")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=None, help="JSON of the loss, grad-norm and FID series")
    parser.add_argument("--plot", default=None, help="PNG of the loss (spikes marked) and grad norm")
    args = parser.parse_args(argv)

    if args.source.endswith(".json"):
        with open(args.source) as f:
            record = json.load(f)
        if args.window_images:
            record["window_images"] = args.window_images
    elif args.window_images is None:
        raise SystemExit("--window-images is needed with a logs folder: logging_steps x the global batch size.")
    else:
        record = record_from_logs(args.source, args.window_images)
    spiked = mark_spikes(record)
    spikes = record["spike_steps"] = [s for s, _ in spiked]
    print(f"{len(record['step'])} logged losses, {len(spikes)} spikes (over 1.5x the recent median)"
          + (f" at steps {spikes[:10]}{'...' if len(spikes) > 10 else ''}" if spikes else ""))
    if args.out:
        write_json_atomically(args.out, record, indent=1)
    if args.plot:
        draw(record, spiked, args.plot, args.title or record.get("log_dir", args.source))


if __name__ == "__main__":
    main()

"""A training run's logged loss and gradient norm, from its TensorBoard logs, as JSON and a picture.

    python benchmarks/plot_training_loss.py OUTPUT_DIR/logs --window-images 25600 \
        --out benchmarks/results/loss-h100-v64-lr5e-4.json --plot benchmarks/results/loss-h100-v64-lr5e-4.png

Each logged loss is the mean over one logging window (--logging_steps optimizer steps times the
global batch: --window-images); the spikes that `training/loss_spikes.py` warns about are marked.
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log_dir")
    parser.add_argument("--window-images", type=int, required=True, help="images per logged loss (logging_steps x global batch)")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=None, help="JSON of the loss, grad-norm and FID series")
    parser.add_argument("--plot", default=None, help="PNG of the loss (spikes marked) and grad norm")
    args = parser.parse_args(argv)

    scalars = read_scalars(args.log_dir)
    if "train/loss" not in scalars:
        raise SystemExit(f"{args.log_dir} has no train/loss scalar; tags: {sorted(scalars)}")
    steps = [s for s, _ in scalars["train/loss"]]
    loss = [v for _, v in scalars["train/loss"]]
    monitor = LossSpikeMonitor()
    spiked = [(s, x) for s, x in zip(steps, loss) if monitor.update(x, args.window_images)]
    spikes = [s for s, _ in spiked]
    record = {"log_dir": args.log_dir, "window_images": args.window_images, "step": steps, "loss": loss,
              "grad_norm": [v for _, v in scalars.get("train/grad_norm", [])],
              "fid": scalars.get("eval/fid", []), "spike_steps": spikes}
    print(f"{len(steps)} logged losses, {len(spikes)} spikes (over 1.5x the recent median)"
          + (f" at steps {spikes[:10]}{'...' if len(spikes) > 10 else ''}" if spikes else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
        top.plot(steps, loss, lw=1, label=f"loss (mean of {args.window_images:,} images)")
        top.scatter(spikes, [x for _, x in spiked], color="red", s=12, zorder=3, label="spike")
        top.set_ylabel("loss")
        top.legend(loc="upper right")
        if scalars.get("train/grad_norm"):
            bottom.plot(*zip(*scalars["train/grad_norm"]), lw=1, color="gray")
        bottom.set_ylabel("grad norm (before clipping)")
        bottom.set_xlabel("optimizer step")
        fig.suptitle(args.title or args.log_dir, fontsize=10)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)


if __name__ == "__main__":
    main()

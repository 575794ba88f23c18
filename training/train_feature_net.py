"""Train the offline FID feature network on Fashion-MNIST:
``python -m training.train_feature_net --out models/fashion-mnist-features``."""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training import data
from training.feature_net import FEATURES_DIR, FashionFeatureNet


def as_tensors(dataset):
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in dataset["image"]])
    return torch.from_numpy(images).float().div(255).unsqueeze(1), torch.tensor(dataset["label"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=FEATURES_DIR)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_name", default=None, help="default: Fashion-MNIST (IDX files or the Hub)")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train = as_tensors(data.load_training_dataset(args.dataset_name, None, "train"))
    x_test, y_test = as_tensors(data.load_training_dataset(args.dataset_name, None, "test"))
    net = FashionFeatureNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(x_train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="feature net")
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // args.batch_size):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            images = x_train[idx]
            images = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, images.flip(-1), images)  # flip augmentation
            loss = F.cross_entropy(net.classify(images), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        predictions = torch.cat([net.classify(x_test[i:i + 1000]).argmax(1) for i in range(0, len(x_test), 1000)])
    accuracy = (predictions == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.4f}")
    net.save_pretrained(args.out)
    with open(f"{args.out}/README.md", "w") as f:
        f.write(f"# Fashion-MNIST feature network\n\nOffline FID/KID features (penultimate layer, {net.num_features}-d) and the "
                f"class histogram of samples. Trained with `python -m training.train_feature_net` "
                f"({args.epochs} epochs, seed {args.seed}); Fashion-MNIST test accuracy {accuracy:.4f}.\n")
    return accuracy


if __name__ == "__main__":
    main()

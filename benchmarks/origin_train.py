"""The origin notebook's way of training, as a whole script: the baseline for benchmarks/bench_train.py.

A per-sample ``Dataset`` that turns each 28x28 uint8 image into a PIL image, applies ToTensor and
Normalize((0.1307,), (0.3081,)) and flattens it to 784, fed through a ``DataLoader`` (batch 64,
shuffle); the same MLP; Adam(lr=1e-3); CrossEntropyLoss; 5 epochs; then accuracy on the test set.
torchvision's transforms are used when torchvision imports; otherwise (this project's CPU machines,
where PyPI's torchvision does not load beside the CPU torch) the same two transforms are written out
with the same per-sample cost profile: PIL image -> float tensor / 255 -> normalise.

``--way numpy`` is the leaner yardstick of issue 11: the same per-sample ``Dataset`` and ``DataLoader``
without PIL (numpy slice, / 255, normalise, flatten, per sample).

Prints one JSON line: {"train_loop_seconds", "accuracy", "epochs", "way"}.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mnist_deploy.data.mnist import load_raw


def _transform():
    try:
        from torchvision import transforms

        return transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,)), transforms.Lambda(torch.flatten)]
        )
    except Exception:  # noqa: BLE001 - torchvision missing or broken: the equivalent by hand

        def to_tensor_normalize_flatten(img: Image.Image) -> torch.Tensor:
            t = torch.from_numpy(np.array(img, dtype=np.uint8)).unsqueeze(0).float().div(255)  # ToTensor
            t = (t - 0.1307) / 0.3081  # Normalize
            return torch.flatten(t)

        return to_tensor_normalize_flatten


class MnistDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i], mode="L")
        return self.transform(img), int(self.labels[i])


class NumpyMnistDataset(Dataset):
    """The leaner yardstick: per sample, a numpy slice scaled, normalised and flattened; no PIL."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].astype(np.float32) / 255 - 0.1307) / 0.3081
        return torch.from_numpy(x.reshape(-1)), int(self.labels[i])


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 128), nn.Linear(128, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--way", choices=("pil", "numpy"), default="pil",
                    help="pil: the origin's per-sample PIL round trip; numpy: the leaner per-sample yardstick")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    raw = load_raw(args.data_dir, allow_download=False)
    if args.way == "pil":
        tf = _transform()

        def make(split):
            return MnistDataset(raw.arrays[f"{split}-images"], raw.arrays[f"{split}-labels"], tf)
    else:

        def make(split):
            return NumpyMnistDataset(raw.arrays[f"{split}-images"], raw.arrays[f"{split}-labels"])

    train_loader = DataLoader(make("train"), batch_size=64, shuffle=True)
    test_loader = DataLoader(make("test"), batch_size=1000)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for xb, yb in train_loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
    loop = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in test_loader:
            correct += (model(xb).argmax(1) == yb).sum().item()
    print(json.dumps({"train_loop_seconds": loop, "accuracy": correct / len(test_loader.dataset),
                      "epochs": args.epochs, "way": args.way}))


if __name__ == "__main__":
    main()

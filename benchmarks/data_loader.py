"""Images/s of one training epoch: autosplit's TensorLoader against a torch DataLoader over a
torchvision-style per-item Dataset doing the same transforms (PIL -> RandomCrop(pad) + flip ->
ToTensor -> Normalize), on the real Fashion-MNIST training split.

Why: every search trial iterates the training set many times; the loader must not be the
bottleneck on a CPU-only machine.

    python benchmarks/data_loader.py [--batch-size 128] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from autosplit.config import DataConfig
from autosplit.data import DatasetInfo, Split, load_splits
from autosplit.loader import TensorLoader


class PerItemDataset(Dataset):
    """What torchvision.datasets.FashionMNIST does per item: a PIL image through the transforms."""

    def __init__(self, split: Split, transform: transforms.Compose) -> None:
        self.images = split.images[:, 0].numpy()  # uint8 (N, 28, 28)
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i], mode="L")), self.labels[i]


def per_item_transform(info: DatasetInfo, augment: bool) -> transforms.Compose:
    steps: list = []
    if augment:
        steps += [
            transforms.RandomCrop(info.image_size, padding=info.crop_padding),
            transforms.RandomHorizontalFlip(),
        ]
    return transforms.Compose(
        steps + [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    )


def images_per_second(batches: Iterable, n_images: int) -> float:
    """Time one full epoch (including worker start-up, which every epoch of a trial pays)."""
    start = time.perf_counter()
    checksum = 0.0
    for batch in batches:
        images = batch.images if hasattr(batch, "images") else batch[0]
        checksum += float(images[0, 0, 0, 0])  # touch the data so nothing is skipped
    return n_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    splits = load_splits(DataConfig(name="fashion-mnist", data_dir=args.data_dir))
    train, info = splits.train, splits.info
    n = len(train)
    print(
        f"fashion-mnist train split: {n} images, batch {args.batch_size}, "
        f"{torch.get_num_threads()} torch threads, CPU"
    )
    header = f"{'augment':<8} {'loader':<34} {'images/s':>10} {'TensorLoader is':>16}"
    print(header)
    print("-" * len(header))
    for augment in (False, True):
        fast_loader = TensorLoader(
            train, info, batch_size=args.batch_size, shuffle=True, augment=augment
        )
        images_per_second(fast_loader, n)  # warm-up (first-touch allocations)
        fast = images_per_second(fast_loader, n)
        print(f"{'on' if augment else 'off':<8} {'TensorLoader':<34} {fast:>10,.0f} {'':>16}")
        dataset = PerItemDataset(train, per_item_transform(info, augment))
        for workers in (0, 2):
            loader = DataLoader(
                dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers
            )
            slow = images_per_second(loader, n)
            label = f"DataLoader per-item, workers={workers}"
            print(
                f"{'on' if augment else 'off':<8} {label:<34} {slow:>10,.0f} {fast / slow:>15.1f}x"
            )


if __name__ == "__main__":
    main()

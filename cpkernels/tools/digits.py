"""A small CNN trained on scikit-learn's bundled 8x8 digits (no download): the trained network that the
demo, the example and the tests compress. Trains in seconds on two CPU cores."""
from __future__ import annotations

import torch
from torch import nn

from cpkernels.core.timing import time_median


def load_digits_tensors(seed: int = 0):
    """(x_train, y_train, x_test, y_test, x_all): images ``[N, 1, 8, 8]`` in [0, 1], a stratified 3:1 split."""
    try:
        # scikit-learn is optional (a test extra): imported on first use
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the digits data ship with scikit-learn: pip install scikit-learn") from error

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test], x


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def train(model, x, y, epochs: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def inference_seconds(model, x, repeats: int = 7) -> float:
    return time_median(model, x, repeats)


@torch.no_grad()
def output_change(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Relative change of the logits: ``||model(x) - reference(x)|| / ||reference(x)||``."""
    model.eval()
    reference.eval()
    ref = reference(x)
    return float((model(x) - ref).norm() / ref.norm())


def trained_cnn(seed: int = 0, epochs: int = 30):
    """(model, data): the CNN trained on the digits' training split, and ``load_digits_tensors(seed)``."""
    torch.manual_seed(seed)
    data = load_digits_tensors(seed)
    model = make_cnn()
    train(model, data[0], data[1], epochs, lr=3e-3, seed=seed)
    return model, data

"""The pytorch/examples MNIST recipe, reproduced for a side-by-side benchmark.

`Net` (two 3×3 convolutions, max-pool, dropout, 9216→128→10), Adadelta with lr 1.0,
StepLR with γ 0.7 every epoch, batch 64, normalisation (0.1307, 0.3081) — as in
pytorch/examples `mnist/main.py`. The data comes from the same in-memory tensors as our
recipe (no DataLoader), which can only make the reference faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def train_reference(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epochs: int,
    on_epoch: Callable[[int, nn.Module, float], bool],
    seed: int = 1,
) -> nn.Module:
    """Train with the reference recipe; `on_epoch(epoch, model, train_seconds)` returns
    True to stop early (e.g. once the target accuracy is reached)."""
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    gen = torch.Generator().manual_seed(seed)
    train_seconds = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), 64):
            idx = order[i : i + 64]
            optimizer.zero_grad()
            loss = F.nll_loss(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
        scheduler.step()
        train_seconds += time.perf_counter() - started
        if on_epoch(epoch, model, train_seconds):
            break
    return model

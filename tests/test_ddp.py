"""Fine-tuning CP layers under DistributedDataParallel: two gloo processes on the CPU stay in sync."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cpkernels import CPConv2d


def _worker(rank: int, world_size: int, init_file: str, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial model on both replicas
        model = nn.Sequential(
            CPConv2d(4, 8, 3, rank=3, padding=1), nn.ReLU(), CPConv2d(8, 8, 3, rank=4, padding=1, groups=2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each replica
        for _ in range(4):
            x = torch.randn(6, 4, 9, 9, generator=gen)
            y = torch.randint(0, 3, (6,), generator=gen)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_replicas_stay_identical_under_ddp():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        states = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    torch.manual_seed(0)
    initial = CPConv2d(4, 8, 3, rank=3, padding=1).state_dict()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert not torch.equal(states[0]["0.input_factor"], initial["input_factor"])  # training did move them

"""Running a task's evaluation passes on every rank and computing its metrics from the gathered rows
(used by fine-tuning's validation and by ``beit3 evaluate``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from beit3.trainer.gather import gather_features
from beit3.trainer.trainer import to_device
from beit3.jobs.finetune.batches import collate, eval_shard
from beit3.jobs.finetune.tasks import Task


@torch.no_grad()
def evaluate(task: Task, model, dataset: Dataset, batch_size: int, device: torch.device,
             dtype: torch.dtype = torch.float32, num_workers: int = 0, output_dir: Optional[str] = None) -> dict:
    """Run the task's eval passes over ``dataset`` on every rank, gather the rows, compute metrics
    (on every rank, so that all of them agree on the best checkpoint)."""
    with torch.random.fork_rng(devices=[]):  # the training stream's RNG is left as it was
        return _evaluate(task, model, dataset, batch_size, device, dtype, num_workers, output_dir)


def _evaluate(task: Task, model, dataset: Dataset, batch_size: int, device: torch.device, dtype: torch.dtype,
              num_workers: int, output_dir: Optional[str]) -> dict:
    was_training = model.training
    model.eval()
    rank, world = _rank_world()
    rows = {}
    for p in task.eval_passes(dataset):
        loader = DataLoader(Subset(p.dataset, eval_shard(len(p.dataset), rank, world)), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=collate)
        parts: dict[str, list] = {}
        for batch in loader:
            for k, v in p.run(model, to_device(batch, device, dtype)).items():
                parts.setdefault(k, []).append(v.detach())
        rows[p.name] = {k: gather_features(torch.cat(v))[:len(p.dataset)].cpu() for k, v in parts.items()}
    model.train(was_training)
    return task.metrics(rows, dataset, output_dir)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def scalars(metrics: dict, prefix: str) -> dict:
    return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

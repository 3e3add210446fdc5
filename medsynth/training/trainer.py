"""The step-budgeted Lightning Trainer and DDP-safe loader shared by the ``fit`` commands.

``dit fit``, ``controlnet fit`` and both stages of ``labels fit`` train for a number of optimiser
steps (not epochs) on small in-memory datasets, checkpoint a few times per run so a killed job
resumes, and must not silently train on nothing when a tiny dataset meets many DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset


def checkpoint_interval(max_steps: int) -> int:
    """Steps between checkpoints: a quarter of the run, at most 1000, at least 1."""
    return max(1, min(1000, int(max_steps) // 4))


def step_trainer(out: str | Path, max_steps: int, checkpoint_dir: str | Path, callbacks: Sequence[L.Callback] = (),
                 *, accelerator: str, devices: int | str, num_nodes: int, strategy: str, precision: str,
                 **trainer_options: Any) -> L.Trainer:
    """A Trainer that stops after ``max_steps`` optimiser steps.

    It checkpoints every :func:`checkpoint_interval` steps into ``checkpoint_dir`` (``last.ckpt``
    kept), logs every ``min(50, interval)`` steps under ``out`` and shows no progress bar (the
    commands print their own summary). ``trainer_options`` override any of these.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    every = checkpoint_interval(max_steps)
    options: dict[str, Any] = {"log_every_n_steps": min(50, every), "enable_progress_bar": False, "max_epochs": -1}
    options.update(trainer_options)
    return L.Trainer(max_steps=int(max_steps), accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                     strategy=strategy, precision=precision, default_root_dir=str(out),
                     callbacks=[ModelCheckpoint(Path(checkpoint_dir), every_n_train_steps=every, save_last=True),
                                *callbacks], **options)


def fit_steps(trainer: L.Trainer, module: L.LightningModule, dataset: Dataset, batch_size: int,
              collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
              resume: str | Path | None = None) -> None:
    """Fit ``module`` on shuffled batches of ``dataset``, resuming from checkpoint ``resume`` if given.

    Under DDP each rank sees ``len(dataset) / world_size`` cases: the last partial batch is dropped
    only when every rank still gets a full one (a small dataset would otherwise train on nothing).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, num_workers=num_workers,
                        drop_last=len(dataset) >= batch_size * max(1, trainer.world_size))
    trainer.fit(module, loader, ckpt_path=None if resume is None else str(resume))


__all__ = ["checkpoint_interval", "step_trainer", "fit_steps"]

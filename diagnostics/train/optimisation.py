"""The optimiser side of CXR training: AdamW with warmup then cosine decay, the fp16 AMP
scaler, class weights, augmentation, and an exponential moving average of the weights."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diagnostics.data.augment import CXRAugment
from diagnostics.train.config import CXRTrainConfig
from diagnostics.train.cxr_data import Images
from diagnostics.train.runtime import Runtime


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    pos_weight: torch.Tensor | None  # (F,) or None
    augment: CXRAugment | None
    ema: Any  # torch.optim.swa_utils.AveragedModel, or None
    steps: int  # optimiser steps per epoch


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def make_optimisation(
    cfg: CXRTrainConfig, model: torch.nn.Module, images: Images, runtime: Runtime
) -> Optimisation:
    """AdamW with warmup then cosine decay, the AMP scaler, class weights, augmentation, EMA."""
    loop = cfg.train
    steps = math.ceil(len(images.train_idx) / loop.batch_size)
    if loop.max_steps_per_epoch:
        steps = min(steps, loop.max_steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop.lr, weight_decay=loop.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(loop.epochs * steps, int(loop.warmup_epochs * steps))
    )
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp == torch.float16)
    pos_weight = None
    if loop.pos_weight == "balanced":
        y = images.labels[images.train_idx]
        pos = np.nansum(y, axis=0)
        neg = np.sum(~np.isnan(y), axis=0) - pos
        pos_weight = torch.tensor(
            np.where(pos > 0, neg / np.maximum(pos, 1), 1.0), device=runtime.device
        )
    augment = (
        CXRAugment(**cfg.augment.model_dump(exclude={"enabled"})) if cfg.augment.enabled else None
    )
    ema = None
    if loop.ema_decay is not None:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(loop.ema_decay), use_buffers=True
        )
    return Optimisation(optimizer, scheduler, scaler, pos_weight, augment, ema, steps)

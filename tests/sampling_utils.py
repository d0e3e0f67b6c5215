"""Untrained micro models for sampling and task tests (mechanics only), and a flow oracle."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from moesaic.config import load_config
from moesaic.data import load_tokenizer
from moesaic.files import cache_dir
from moesaic.model import Transformer, heads
from moesaic.runconfig import resolve_model_dims
from moesaic.train.loop import Trainer
from moesaic.train.runs import LoadedRun
from tests.train_utils import MICRO


def micro_run(*overrides: str, seed: int = 0) -> LoadedRun:
    """A `LoadedRun` of a randomly initialised micro model (no run directory)."""
    cfg = load_config("tiny", [*MICRO, *overrides])
    tok = load_tokenizer(cfg.data, cache_dir())
    cfg = resolve_model_dims(cfg, tok.vocab_size)
    torch.manual_seed(seed)
    model = Transformer(cfg.model).eval()
    return LoadedRun(Path("."), cfg, tok, model, 0, torch.device("cpu"))


def micro_run_dir(out: Path, *overrides: str) -> Path:
    """A run directory with a step-0 checkpoint of a micro model (no training)."""
    cfg = load_config("tiny", [*MICRO, f"out={out}", "name=micro", *overrides])
    trainer = Trainer(cfg)
    trainer.save_checkpoint()
    return trainer.run_dir


class FlowOracle(nn.Module):
    """Predicts the exact velocity (x0 − ε, from x_t and t) or x0 toward fixed target patches
    [N, m, P]; rows beyond N (the unconditional branch) repeat the targets."""

    def __init__(self, target_NmP: Tensor, prediction: str):
        super().__init__()
        self.target = target_NmP
        self.cfg = SimpleNamespace(prediction=prediction)
        self.calls = 0

    def forward(self, batch, **kw):
        self.calls += 1
        img = batch.image_mask
        B, L, P = batch.patches.shape
        x0 = self.target.repeat(B // self.target.shape[0], 1, 1).reshape(-1, P)
        x_t = heads.flow_input(batch.patches, batch.noise, batch.t)[img]
        t = batch.t[img].unsqueeze(-1)
        pred = x0 if self.cfg.prediction == "x0" else (x0 - x_t) / (1 - t)
        image_pred = torch.zeros(B, L, P)
        image_pred[img] = pred
        return SimpleNamespace(image_pred=image_pred)

"""Load a trained run (config, tokenizer, latest verified checkpoint) for evaluation/analysis."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moesaic.batch import Batch
from moesaic.config import Config, load_config
from moesaic.data import build_eval_sets, load_tokenizer
from moesaic.errors import CheckpointError
from moesaic.evaluate.losses import eval_losses
from moesaic.files import cache_dir
from moesaic.model import Transformer
from moesaic.train import checkpoint as ckpt
from moesaic.train.dist_checkpoint import latest_any_checkpoint
from moesaic.train.runtime import autocast_factory, resolve_device


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    cfg: Config
    tokenizer: object
    model: Transformer
    step: int
    device: torch.device

    def autocast(self):
        return autocast_factory(self.cfg.train, self.device)()

    def eval_sets(self, n_batches: int | None = None) -> dict[str, list[Batch]]:
        n = n_batches or self.cfg.eval.batches
        return build_eval_sets(self.cfg.data, self.tokenizer, self.cfg.eval.seed, n)

    def eval_losses(self, n_batches: int | None = None) -> dict[str, float]:
        factory = autocast_factory(self.cfg.train, self.device)
        return eval_losses(self.model, self.eval_sets(n_batches), self.device, factory)


def load_run(run_dir: Path, device: str = "auto") -> LoadedRun:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a moesaic run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", [f"train.device={device}"])
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"run directory '{run_dir}' has no tokenizer.json")
    tokenizer = load_tokenizer(dataclasses.replace(cfg.data, tokenizer=str(tok_path)), cache_dir())
    found, rejected = latest_any_checkpoint(run_dir / "checkpoints")
    if found is None:
        why = f" ({rejected[0]})" if rejected else ""
        raise CheckpointError(f"run directory '{run_dir}' has no usable checkpoint{why}")
    dev = resolve_device(cfg.train.device)
    model = Transformer(cfg.model)
    state = ckpt.load_tensors(found, "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{found.path}' does not fit the run's model config")
    model.to(dev).eval()
    return LoadedRun(run_dir, cfg, tokenizer, model, found.step, dev)

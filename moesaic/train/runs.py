"""Load a trained run for `eval`, `sample`, `analyze` and the studies: one loader, one check.

`load_run(RUN_DIR)` reads the run's config and tokenizer, picks the newest checkpoint that
verifies (sizes and sha256 of every file, and the config fingerprint the trainer wrote into
it), and loads its weights. A checkpoint written by a different config, or weights that do not
fit the model the config builds, are refused with one line; a corrupt newer checkpoint is
skipped, and the loaded run says which checkpoint it used and why newer ones were not.
"""

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
from moesaic.runconfig import config_fingerprint, resolve_model_dims
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
    checkpoint: Path | None = None  # the checkpoint directory the weights came from
    skipped: tuple[str, ...] = ()  # why newer checkpoints were not used

    def autocast(self):
        return autocast_factory(self.cfg.train, self.device)()

    def eval_sets(self, n_batches: int | None = None) -> dict[str, list[Batch]]:
        n = n_batches or self.cfg.eval.batches
        cfg = self.cfg
        return build_eval_sets(
            cfg.data, self.tokenizer, cfg.eval.seed, n, ood_text=cfg.eval.ood_text
        )

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
    cfg = resolve_model_dims(cfg, tokenizer.vocab_size)
    try:
        found, rejected = latest_any_checkpoint(run_dir / "checkpoints", config_fingerprint(cfg))
    except CheckpointError as e:  # a checkpoint of another config: config.yaml was edited
        raise CheckpointError(
            f"{str(e).split(';')[0]}, not by '{run_dir / 'config.yaml'}'; restore the run's own "
            "config.yaml"
        ) from None
    if found is None:
        why = f" ({rejected[0]})" if rejected else ""
        raise CheckpointError(f"run directory '{run_dir}' has no usable checkpoint{why}")
    dev = resolve_device(cfg.train.device)
    model = Transformer(cfg.model)
    state = ckpt.load_tensors(found, "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:  # a tensor of the wrong shape
        missing, unexpected = ["(shapes differ)"], []
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{found.path}' does not fit the model that '{run_dir / 'config.yaml'}' "
            "builds; restore the run's own config.yaml"
        )
    model.to(dev).eval()
    return LoadedRun(run_dir, cfg, tokenizer, model, found.step, dev, found.path, tuple(rejected))

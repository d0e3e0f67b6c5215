"""The training loop: one run directory, exact resume, skipped non-finite steps.

A run directory `OUT/NAME/` holds `config.yaml` (the resolved config), `tokenizer.json`,
`metrics.jsonl`, `checkpoints/step-*/` and, at the end, `summary.json`. Everything a step
consumes — data, noise, flow times — comes from the data stream, whose position is saved with
the weights, optimizer and RNG states; on CPU a resumed run is bit-identical to an
uninterrupted one.

Launched by torchrun with several processes, the same loop trains data parallel (FSDP2, and
expert parallel with `dist.expert_parallel`; see `distributed.py`): every rank reads its own
shard of the data, only rank 0 writes logs and run files, and checkpoints are sharded
(`dist_checkpoint.py`) and resume with any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch

from moesaic.config import Config
from moesaic.data import build_eval_sets, build_stream, load_tokenizer
from moesaic.errors import CheckpointError, ConfigError, MoesaicError
from moesaic.evaluate.losses import evaluate
from moesaic.files import atomic_write_text, cache_dir
from moesaic.model import Transformer
from moesaic.model.moe import update_router_biases
from moesaic.runconfig import config_fingerprint, resolve_model_dims, run_dir_for
from moesaic.train import checkpoint as ckpt
from moesaic.train import dist_checkpoint as dckpt
from moesaic.train import distributed
from moesaic.train.faults import Stopped, os_errors, raise_stop, signal_name, start_up_debris
from moesaic.train.malloc import retain_freed_memory
from moesaic.train.metrics import MetricsLog
from moesaic.train.optim import (
    build_optimizer,
    clip_grad_norm_,
    load_optimizer_state,
    lr_at,
    optimizer_state_to_tensors,
    set_lr,
)
from moesaic.train.progress import Progress
from moesaic.train.runtime import autocast_factory, resolve_device, set_threads
from moesaic.train.watchdog import Watchdog, report_failures


class TrainingDiverged(MoesaicError):
    """Too many consecutive non-finite steps."""


class Trainer:
    """Build everything for one run; `run()` trains to `train.steps` and returns the summary."""

    def __init__(self, cfg: Config, run_dir: Path | None = None, resume: bool = False):
        self.run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
        set_threads(cfg.train)
        self.device = distributed.rank_device(
            resolve_device(cfg.train.device), distributed.env_world()
        )
        if self.device.type == "cpu":
            retain_freed_memory()
        self.owns_process_group = not torch.distributed.is_initialized()
        self.world = distributed.init_distributed(cfg.dist.timeout_s, cfg.dist.backend, self.device)
        self.owns_process_group &= self.world.distributed
        self.watchdog, self.failed = None, False
        if self.world.distributed and cfg.dist.watchdog_s > 0:
            self.watchdog = Watchdog(self.world, cfg.dist.watchdog_s).start()
        with report_failures(self.watchdog):
            self._build(cfg, resume)

    def _build(self, cfg: Config, resume: bool) -> None:
        self._check_run_dir(resume)
        distributed.barrier()  # every rank checked the directory before rank 0 writes into it
        self.autocast = autocast_factory(cfg.train, self.device)
        tok_path = self.run_dir / "tokenizer.json"
        # A run stopped before its first checkpoint may lack its tokenizer: make it again.
        new_tokenizer = not resume or (
            not tok_path.is_file() and not ckpt.list_checkpoints(self.run_dir / "checkpoints")
        )
        data_cfg = (
            cfg.data if new_tokenizer else dataclasses.replace(cfg.data, tokenizer=str(tok_path))
        )
        with distributed.main_process_first(), os_errors("prepare the tokenizer"):
            self.tokenizer = load_tokenizer(data_cfg, cache_dir())
        self.cfg = cfg = resolve_model_dims(cfg, self.tokenizer.vocab_size).validate()
        self.fingerprint = config_fingerprint(cfg)

        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(cfg.model).to(self.device)
        if self.world.distributed:
            distributed.parallelize(self.model, cfg.dist, self.device, cfg.train.precision)
        self.optimizer = build_optimizer(self.model, cfg.train)
        rank, world_size = self.world.rank, self.world.world_size
        self.stream = build_stream(cfg.data, self.tokenizer, "train", rank, world_size)
        self.eval_sets = build_eval_sets(
            cfg.data, self.tokenizer, cfg.eval.seed, cfg.eval.batches, ood_text=cfg.eval.ood_text
        )
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model

        self.step = 0  # completed optimizer steps (skipped ones included)
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.elapsed = 0.0
        self.stop_signal: int | None = None
        self.saved_step: int | None = None  # the step of the newest checkpoint on disk
        self.warned: set[str] = set()
        self.valid: dict[str, bool] = {}  # checkpoint directory name -> verified (cached)
        resume_step = self._load_latest() if resume else None
        self.metrics = distributed.NullLog()
        if self.world.is_main:
            with os_errors(f"the run directory '{self.run_dir}'"):
                if not resume:
                    self.run_dir.mkdir(parents=True, exist_ok=True)
                    for leftover in filter(start_up_debris, self.run_dir.iterdir()):
                        leftover.unlink()  # what a start killed while writing left behind
                    atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
                if new_tokenizer:
                    self.tokenizer.save(tok_path)
                start = resume_step if resume_step is not None else (0 if resume else None)
                self.metrics = MetricsLog(self.run_dir, cfg.logging.tensorboard, start)

    # ------------------------------------------------------------------ run directory, resume

    def _check_run_dir(self, resume: bool) -> None:
        if resume:
            if not (self.run_dir / "config.yaml").is_file():
                raise CheckpointError(f"nothing to resume: '{self.run_dir}' has no config.yaml")
            return
        if self.run_dir.exists() and not all(map(start_up_debris, self.run_dir.iterdir())):
            raise ConfigError(
                f"run directory '{self.run_dir}' already exists; continue it with "
                f"--resume {self.run_dir} or choose another name=..."
            )

    def _warn(self, message: str) -> None:
        """Print a warning once per run (rank 0)."""
        if self.world.is_main and message not in self.warned:
            self.warned.add(message)
            print(f"warning: {message}", flush=True)

    def _load_latest(self) -> int | None:
        """Load the newest checkpoint that verifies; None when the run has none yet."""
        root = self.run_dir / "checkpoints"
        found, rejected = dckpt.latest_any_checkpoint(root, self.fingerprint)
        for message in rejected:
            self._warn(f"skipping checkpoint: {message}")
        if found is None and not rejected:
            if self.world.is_main:
                print(f"no checkpoint in '{self.run_dir}' yet: starting it from step 0", flush=True)
            return None
        if found is None:
            raise CheckpointError(
                f"'{self.run_dir}' has no usable checkpoint to resume from ({rejected[0]}); "
                f"move '{root}' away to start the run again from step 0"
            )
        state = found.state
        if dckpt.is_sharded(found.path):
            dckpt.load_dcp(found.path / dckpt.DCP_DIR, self.model, self.optimizer)
        elif self.world.distributed:
            dckpt.load_full_state(
                self.model,
                self.optimizer,
                ckpt.load_tensors(found, "model.safetensors"),
                ckpt.load_tensors(found, "optimizer.safetensors"),
            )
        else:
            self._load_single_process(found)
        rank, world_size = self.world.rank, self.world.world_size
        saved = ckpt.load_tensors(found, "rng.safetensors")
        rng = dckpt.rank_rng(saved, rank, world_size, state.get("world_size", 1))
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.stream.load_state_dict(dckpt.rank_stream_state(state, rank, world_size))
        trainer = state["trainer"]
        self.step = self.saved_step = found.step
        self.valid[found.path.name] = True
        self.tokens_seen = trainer["tokens_seen"]
        self.skipped_steps = trainer["skipped_steps"]
        self.bad_in_a_row = trainer["bad_in_a_row"]
        self.elapsed = trainer["elapsed"]
        return found.step

    def _load_single_process(self, found: ckpt.Checkpoint) -> None:
        model_state = ckpt.load_tensors(found, "model.safetensors")
        missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint '{found.path}' does not fit the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        load_optimizer_state(
            self.optimizer,
            self.model,
            ckpt.load_tensors(found, "optimizer.safetensors"),
            found.state["optimizer"],
        )

    def save_checkpoint(self) -> Path:
        """Checkpoint the current step (a no-op when the newest checkpoint already holds it)."""
        root = self.run_dir / "checkpoints"
        if self.step == self.saved_step:
            return root / ckpt.checkpoint_dir_name(self.step)
        name = distributed.first_nonfinite_parameter(self.model)
        if name is not None:
            raise TrainingDiverged(
                f"refusing to checkpoint non-finite weights ({name}) at step {self.step}; "
                + self._divergence_fix()
            )
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config_fingerprint": self.fingerprint,
            "data": self.stream.state_dict(),
            "trainer": {
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "bad_in_a_row": self.bad_in_a_row,
                "elapsed": self.elapsed,
                "rows_per_step": self.cfg.data.batch_size * self.cfg.train.grad_accum,
            },
        }
        keep = self.cfg.train.keep_checkpoints
        try:
            if self.world.distributed:
                path = dckpt.save_sharded_checkpoint(
                    root, self.step, self.model, self.optimizer, rng, state, keep, self._warn,
                    self._valid,
                )  # fmt: skip
            else:
                opt_tensors, state["optimizer"] = optimizer_state_to_tensors(
                    self.optimizer, self.model
                )
                path = ckpt.save_checkpoint(
                    root,
                    self.step,
                    self.model.state_dict(),
                    opt_tensors,
                    rng,
                    state,
                    keep,
                    self._warn,
                    self._valid,
                )
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}; then continue with: moesaic train --resume {self.run_dir}"
            ) from None
        self.saved_step = self.step
        self.valid[path.name] = True
        return path

    def _valid(self, path: Path) -> bool:
        """Whether a checkpoint verifies (hashed once per process): only these are counted
        when old checkpoints are pruned."""
        if path.name not in self.valid:
            try:
                dckpt.verify_any(path, self.fingerprint)
                self.valid[path.name] = True
            except CheckpointError:
                self.valid[path.name] = False
        return self.valid[path.name]

    def _divergence_fix(self) -> str:
        """What to do after a divergence: the same settings would diverge again on resume."""
        cfg = self.cfg.train
        fix = (
            f"start a new run with a lower train.lr (now {cfg.lr:g}) or a longer train.warmup "
            f"(now {cfg.warmup})"
        )
        if self.saved_step is None:
            return (
                f"no checkpoint was written; {fix} (--resume would start '{self.run_dir}' over "
                "from step 0 with the same settings)"
            )
        return f"the last checkpoint (step {self.saved_step}) holds finite weights; {fix}"

    # ------------------------------------------------------------------ steps

    def train_step(self) -> dict[str, float]:
        """One optimizer step over `grad_accum` micro-batches; skipped if anything is non-finite."""
        cfg = self.cfg.train
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        sums = torch.zeros(5, device=self.device)
        for _ in range(cfg.grad_accum):
            batch = next(self.stream).to(self.device)
            with self.autocast():
                out = self.forward(batch)
            (out.loss / cfg.grad_accum).backward()
            parts = [out.loss, out.text_loss, out.image_loss, out.aux_loss, out.video_loss]
            sums += torch.stack(parts).detach().float() / cfg.grad_accum
            self.tokens_seen += batch.tokens.numel() * self.world.world_size
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        if self.world.distributed:  # global mean loss and norm: every rank decides alike
            distributed.all_reduce_mean(sums)
            grad_norm = distributed.clip_grad_norm(params, max_norm)
        else:
            grad_norm = clip_grad_norm_(params, max_norm)  # memory tables: sparse
        loss, text_loss, image_loss, aux_loss, video_loss = sums.tolist()
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            update_router_biases(self.model, all_reduce=distributed.all_reduce_sum)
            self.bad_in_a_row = 0
        else:
            update_router_biases(self.model, skip=True)
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.bad_in_a_row >= cfg.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_in_a_row} consecutive steps had non-finite loss or gradients "
                f"(last at step {self.step}, loss={loss}, grad_norm={float(grad_norm)}); "
                + self._divergence_fix()
            )
        return {
            "loss": loss,
            "text_loss": text_loss,
            "image_loss": image_loss,
            "video_loss": video_loss,
            "aux_loss": aux_loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "skipped": not finite,
        }

    def evaluate(self) -> tuple[dict[str, Any], dict[str, list]]:
        """(held-out losses per set plus routing counts per MoE layer on the eval sets, the
        losses of every eval batch)."""
        self.model.reset_routing_stats()
        reduce = distributed.all_reduce_sum if self.world.distributed else None
        result = evaluate(
            self.model, self.eval_sets, self.device, self.autocast,
            self.world.rank, self.world.world_size, reduce,
        )  # fmt: skip
        if self.world.distributed:
            distributed.all_reduce_routing_stats(self.model)
        routing = {
            str(layer): {k: v.tolist() for k, v in stats.items()}
            for layer, stats in self.model.routing_stats().items()
        }
        self.model.reset_routing_stats()
        return {"losses": result.means, "routing": routing}, result.batches

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signum

    def run(self) -> dict[str, Any]:
        try:
            with report_failures(self.watchdog):
                return self._run()
        except BaseException:
            self.failed = True
            raise

    def close(self) -> None:
        """Stop the watchdog and leave the process group this trainer joined (if it did).

        After a failure the group is left as it is: with a peer gone, tearing it down can wait
        on that peer, and the process is about to exit anyway."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.failed:
            return
        distributed.barrier()  # no rank leaves (rank 0 may host the store) while others watch
        if self.owns_process_group:
            distributed.shutdown_distributed()
            self.owns_process_group = False

    def _log(self, record: dict[str, Any]) -> None:
        with os_errors(f"the metrics log in '{self.run_dir}'"):
            self.metrics.log(record)

    def _run(self) -> dict[str, Any]:
        """Train to `train.steps`, checkpoint, evaluate. SIGTERM / SIGINT stop the loop after
        the current step and checkpoint it; during the final evaluation they stop it at once
        (the checkpoint is already written and `--resume` finishes the evaluation)."""
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            status = self._train_loop()
            self.save_checkpoint()  # a second signal while saving is noted, not obeyed
            summary = self._summary(status)
            if status == "interrupted":
                self._say(
                    f"stopped by {signal_name(self.stop_signal)} at step {self.step}; checkpoint "
                    f"saved. Continue with: moesaic train --resume {self.run_dir}"
                )
                return summary
            try:
                for s in handlers:
                    signal.signal(s, raise_stop)
                if distributed.any_rank(self.stop_signal is not None):
                    raise Stopped(self.stop_signal or signal.SIGTERM)
                final, per_batch = self.evaluate()
            except Stopped as stop:
                self._say(
                    f"stopped by {signal_name(stop.signum)} before the final evaluation of step "
                    f"{self.step} (its checkpoint is saved); finish it with: moesaic train "
                    f"--resume {self.run_dir}"
                )
                summary["status"] = "interrupted"
                return summary
            finally:
                for s in handlers:  # the last writes are short: a signal now is ignored
                    signal.signal(s, self._on_signal)
            self._log({"kind": "eval", "step": self.step, **final})
            summary["eval"] = final["losses"]
            summary["eval_batches"] = per_batch
            if self.world.is_main:
                with os_errors(f"summary.json in '{self.run_dir}'"):
                    atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
            return summary
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.metrics.close()

    def _say(self, message: str) -> None:
        if self.world.is_main:
            print(message, flush=True)

    def _train_loop(self) -> str:
        """Steps until `train.steps` ("finished") or a stop signal ("interrupted")."""
        cfg = self.cfg
        mode = cfg.logging.progress if self.world.is_main else "none"
        progress = Progress(cfg.train.steps, self.step, mode, desc=cfg.name)
        try:
            window_start, window_tokens = time.perf_counter(), self.tokens_seen
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                values = self.train_step()
                self.elapsed += time.perf_counter() - t0
                if values["skipped"]:
                    progress.write(f"step {self.step}: non-finite loss or gradients, step skipped")
                log_now = self.step % cfg.logging.every == 0 or self.step == cfg.train.steps
                if log_now:
                    now = time.perf_counter()
                    tok_s = (self.tokens_seen - window_tokens) / max(now - window_start, 1e-9)
                    window_start, window_tokens = now, self.tokens_seen
                    record = {"kind": "train", "step": self.step, "tokens": self.tokens_seen}
                    record |= {k: v for k, v in values.items() if k != "skipped"}
                    record |= {"skipped_steps": self.skipped_steps, "tokens_per_s": tok_s}
                    self._log(record)
                    shown = {k: values[k] for k in ("loss", "text_loss", "image_loss")}
                    if values["video_loss"]:
                        shown["video_loss"] = values["video_loss"]
                    progress.update(self.step, shown | {"tok/s": round(tok_s)}, force_line=True)
                else:
                    progress.update(self.step, {k: values[k] for k in ("loss",)})
                if (
                    cfg.eval.every
                    and self.step % cfg.eval.every == 0
                    and self.step < cfg.train.steps
                ):
                    self._log({"kind": "eval", "step": self.step, **self.evaluate()[0]})
                every = cfg.train.checkpoint_every
                if every and self.step % every == 0 and self.step < cfg.train.steps:
                    self.save_checkpoint()
                if distributed.any_rank(self.stop_signal is not None):
                    return "interrupted"
        finally:
            progress.close()
        return "finished"

    def _summary(self, status: str) -> dict[str, Any]:
        seq_len = self.cfg.data.seq_len
        flops_per_token = self.model.flops_per_token(seq_len)
        return {
            "status": status,
            "name": self.cfg.name,
            "step": self.step,
            "tokens": self.tokens_seen,
            "params_total": self.model.num_params(active=False),
            "params_active": self.model.num_params(active=True),
            "flops_per_token": flops_per_token,
            "train_flops": flops_per_token * self.tokens_seen,
            "train_seconds": self.elapsed,
            "tokens_per_s": self.tokens_seen / max(self.elapsed, 1e-9),
            "skipped_steps": self.skipped_steps,
            "data_skipped": dict(self.stream.skipped),
            "data_produced": self._produced(),
            "data_produced_by_source": {
                name: self._produced(by_kind)
                for name, by_kind in self.stream.produced_by_source.items()
            },
            "eval_sources": self.eval_sets.sources,
        }

    def _produced(self, produced: dict[str, int] | None = None) -> dict[str, int]:
        """Document tokens drawn per kind (padding excluded), summed over ranks."""
        produced = dict(self.stream.produced if produced is None else produced)
        if self.world.distributed:
            total: dict[str, int] = {}
            for part in distributed.all_gather_object(produced):
                for kind, n in part.items():
                    total[kind] = total.get(kind, 0) + n
            produced = total
        return produced

"""The experiment engine: a declarative grid of runs, trained (or reused) once, then analysed.

An experiment is a module that provides an `Experiment`: its study config class and presets,
`plan()` — the list of `RunSpec`s (a name and the training-config overrides of each run) —,
`summarize()` — the numbers it reports, from the finished runs — and `report()` — its HTML
page. Everything every experiment needs lives here once:

* **reuse**: a run directory whose `config.yaml` has the same fingerprint (everything that
  determines the computation, `runconfig.config_fingerprint`) and the same step count, and a
  finished `summary.json`, is reused as is; adding seeds, arms or sizes reuses everything
  already trained;
* **resume**: an interrupted run continues exactly from its newest valid checkpoint; a run that
  never reached one starts over; a run directory trained with another config is refused;
* **jobs**: `study.jobs` runs train at once in spawned processes (`workers.py`); results are
  collected in plan order, so the summary does not depend on the number of jobs;
* **progress**: one line per finished run (`[k/n] name: trained (s) losses`, then an estimate
  of the time left), and the elapsed time at the end;
* **outputs**: `STUDY_DIR/summary.json` (schema `SCHEMA`: `experiment`, `study`, `seeds`, `runs`
  and the experiment's own sections) and `STUDY_DIR/report.html`.

A study directory holds `study.json` (the study config), `runs/<run name>/` and the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from moesaic.config import Config, load_config
from moesaic.errors import CheckpointError, ConfigError, MoesaicError, did_you_mean
from moesaic.experiments.study import StudyConfig
from moesaic.files import atomic_write_text, cache_dir
from moesaic.jsonsafe import json_safe
from moesaic.runconfig import config_fingerprint, resolve_model_dims

SCHEMA = "moesaic-study/1"
# experiment name -> module providing EXPERIMENT
EXPERIMENTS = {
    "tax": "moesaic.experiments.compete",
    "capacity": "moesaic.experiments.capacity",
    "caption-shift": "moesaic.experiments.caption_shift",
    "isoflop": "moesaic.experiments.isoflop",
    "memory-allocation": "moesaic.experiments.allocation",
    "depth-width": "moesaic.experiments.depth",
}


class StudyInterrupted(MoesaicError):
    """A run stopped on a signal; its checkpoint is saved and the study can be continued."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a study: its name (the run directory), its training-config overrides on top
    of the study's base, and tags the analysis groups runs by (arm, variant, seed, size, …)."""

    name: str
    overrides: tuple[str, ...]
    tags: tuple[tuple[str, Any], ...] = ()

    def tag(self, key: str, default: Any = None) -> Any:
        return dict(self.tags).get(key, default)

    def run_dir(self, study_dir: Path) -> Path:
        return Path(study_dir) / "runs" / self.name


def run_name(*parts: Any) -> str:
    """The one way run names are formed: `arm-variant-s0`, `dense-text-d64-s1`, …"""
    return "-".join(str(p) for p in parts if p is not None and p != "")


@dataclasses.dataclass
class RunResult:
    spec: RunSpec
    run_dir: Path
    summary: dict[str, Any]  # the run's summary.json
    extra: dict[str, Any]  # what the experiment's `after_run` added (e.g. task scores)
    how: str  # trained | resumed | reused
    seconds: float


class Experiment(Protocol):
    name: str
    config_class: type[StudyConfig]
    presets: dict[str, dict[str, Any]]

    def plan(self, study: Any, study_dir: Path, log: Callable[[str], None]) -> list[RunSpec]: ...

    def after_run(self, study: Any, spec: RunSpec, run_dir: Path) -> dict[str, Any]: ...

    def summarize(
        self, study: Any, study_dir: Path, results: list[RunResult], log: Callable[[str], None]
    ) -> dict[str, Any]: ...

    def report(self, summary: dict[str, Any], study_dir: Path) -> Any: ...

    def console(self, summary: dict[str, Any]) -> str: ...


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{name}'{did_you_mean(name, EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).EXPERIMENT


# ----------------------------------------------------------------------------- one run


def base_config(study: StudyConfig, extra: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(study.base, [*study.overrides, *extra])


def run_config(study: StudyConfig, spec: RunSpec, study_dir: Path) -> Config:
    return base_config(
        study, [*spec.overrides, f"name={spec.name}", f"out={Path(study_dir) / 'runs'}"]
    )


def tokenizer_for(cfg: Config) -> Any:
    """The tokenizer a run of `cfg` trains with (cached per data config)."""
    from moesaic.data import load_tokenizer

    return load_tokenizer(cfg.data, cache_dir())


def fingerprint(cfg: Config, vocab_size: int) -> str:
    """The Trainer's fingerprint of a run config (model dims resolved as the Trainer does)."""
    return config_fingerprint(resolve_model_dims(cfg, vocab_size))


def _check_same_run(cfg: Config, run_dir: Path, vocab_size: int) -> None:
    saved = load_config(run_dir / "config.yaml")
    if config_fingerprint(saved) != fingerprint(cfg, vocab_size) or (
        saved.train.steps != cfg.train.steps
    ):
        raise ConfigError(
            f"run '{run_dir}' was trained with a different configuration than this study asks "
            "for; pass another --out (or study.name=...) or delete that run directory"
        )


def ensure_run(cfg: Config, run_dir: Path) -> tuple[dict[str, Any], str]:
    """Train (or resume, or reuse) one run; returns (summary.json content, what happened)."""
    from moesaic.train.dist_checkpoint import latest_any_checkpoint
    from moesaic.train.loop import Trainer

    vocab_size = tokenizer_for(cfg).vocab_size
    summary_path = run_dir / "summary.json"
    if (run_dir / "config.yaml").is_file():
        _check_same_run(cfg, run_dir, vocab_size)
        if summary_path.is_file():
            done = json.loads(summary_path.read_text())
            if done.get("status") == "finished" and done.get("step") == cfg.train.steps:
                return done, "reused"
        try:
            found, _ = latest_any_checkpoint(run_dir / "checkpoints", fingerprint(cfg, vocab_size))
        except CheckpointError:
            raise CheckpointError(
                f"the checkpoint of unfinished run '{run_dir}' was written by a different "
                "configuration or version of moesaic and cannot be resumed; delete that run "
                "directory to train it again"
            ) from None
        if found is not None:
            return Trainer(cfg, run_dir, resume=True).run(), "resumed"
        shutil.rmtree(run_dir)  # started but never checkpointed: nothing to keep
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"'{run_dir}' exists but is not a moesaic run; move it away")
    return Trainer(cfg, run_dir).run(), "trained"


def _run_one(
    experiment_name: str, study: StudyConfig, study_dir: Path, spec: RunSpec
) -> tuple[dict[str, Any], dict[str, Any], str, float]:
    """Train / resume / reuse one run and its extras (also a worker-process entry)."""
    t0 = time.perf_counter()
    run_dir = spec.run_dir(study_dir)
    summary, how = ensure_run(run_config(study, spec, study_dir), run_dir)
    extra = {}
    if summary.get("status") == "finished":
        extra = get_experiment(experiment_name).after_run(study, spec, run_dir)
    return summary, extra, how, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the study


def _shown(summary: dict[str, Any]) -> str:
    losses = summary.get("eval", {})
    keys = ("text/text", "image/image")
    return ", ".join(f"{k}={losses[k]:.4f}" for k in keys if k in losses)


def train_all(
    experiment: Experiment,
    study: StudyConfig,
    study_dir: Path,
    specs: list[RunSpec],
    log: Callable[[str], None],
) -> list[RunResult]:
    """Every run, `study.jobs` at a time; results in plan order."""
    results: dict[str, RunResult] = {}
    t0 = time.perf_counter()
    trained = 0

    def record(spec: RunSpec, result: tuple) -> None:
        nonlocal trained
        summary, extra, how, seconds = result
        if summary.get("status") != "finished":
            raise StudyInterrupted(
                f"stopped during {spec.name} (checkpoint saved); run the same command again "
                "to continue the study"
            )
        results[spec.name] = RunResult(spec, spec.run_dir(study_dir), summary, extra, how, seconds)
        trained += how != "reused"
        done = len(results)
        eta = ""
        if how != "reused" and done < len(specs):
            per_run = (time.perf_counter() - t0) / trained
            eta = f"; about {per_run * (len(specs) - done) / 60:.1f} min left"
        log(f"[{done}/{len(specs)}] {spec.name}: {how} ({seconds:.0f} s) {_shown(summary)}{eta}")

    run = functools.partial(_run_one, experiment.name, study, study_dir)
    if study.jobs <= 1:
        for spec in specs:
            record(spec, run(spec))
    else:
        from moesaic.experiments.workers import run_parallel

        try:
            run_parallel(run, specs, study.jobs, record)
        except KeyboardInterrupt:
            raise StudyInterrupted(
                "study interrupted (running runs saved a checkpoint); run the same command "
                "again to continue"
            ) from None
    return [results[s.name] for s in specs]


def run_experiment(
    experiment: Experiment, study: StudyConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Plan, train every missing run, summarise, write summary.json and report.html."""
    study_dir = Path(out) / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment.name, **dataclasses.asdict(study)}
    atomic_write_text(study_dir / "study.json", json.dumps(record, indent=1))
    specs = experiment.plan(study, study_dir, log)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"experiment '{experiment.name}' planned two runs with one name")
    results = train_all(experiment, study, study_dir, specs, log)
    body = experiment.summarize(study, study_dir, results, log)
    summary = json_safe(
        {
            "schema": SCHEMA,
            "experiment": experiment.name,
            "study": dataclasses.asdict(study),
            "seeds": study.seed_list(),
            "runs": {
                r.spec.name: {"dir": str(r.run_dir), "tags": dict(r.spec.tags)} for r in results
            },
            **body,
            "report": "report.html",
        }
    )
    text = json.dumps(summary, indent=1, allow_nan=False)
    atomic_write_text(study_dir / "summary.json", text)
    experiment.report(summary, study_dir).write(study_dir / "report.html")
    return summary

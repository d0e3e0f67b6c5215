"""The modality-competition study: per arm, a text-only, an image-only and a joint run.

Data ("same data"). With seed s every run uses `data.seed = train.seed = s`; a document of a
given kind and index is a pure function of the data seed (moesaic.data.packing), whatever the
mix. The three runs of an arm:

    text   `data.mix = {text: 1}`, `text_steps` steps
    image  `data.mix = study.image_mix` (caption→image pairs and bare images), `image_steps`
           steps, `data.caption_loss = false`: the captions are conditioning only
    joint  `data.mix` = the document tokens per kind that the two unimodal streams produce
           (measured by replaying them before training); as many steps as its own stream
           needs to produce that many tokens (≈ text_steps + image_steps, a few percent fewer
           because mixed rows pack with less padding)

Because the packer's scheduler keeps every kind exactly at its token share, the joint stream
draws the same text documents as the text-only run and the same image documents as the
image-only run, in the same order, interleaved: the joint run sees the union of the unimodal
runs' data (equal token budget per modality) and nothing else. `data.caption_loss = false`
everywhere, so every loss-bearing token of the joint run is one that a unimodal run also trains
on. After training, the joint stream's actual tokens per kind are compared with the unimodal
ones ("coverage" in summary.json; 1.0 = identical, at most one step's worth more).
All arms of a seed see identical data, at the same active FFN compute per token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moesaic.config import Config, load_config
from moesaic.errors import CheckpointError, ConfigError, MoesaicError
from moesaic.experiments.arms import get_arm
from moesaic.experiments.presets import StudyConfig
from moesaic.files import atomic_write_text

VARIANTS = ("text", "image", "joint")


class StudyInterrupted(MoesaicError):
    """A run stopped on a signal; its checkpoint is saved and the study can be continued."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    arm: str
    variant: str
    seed: int
    name: str
    overrides: tuple[str, ...]

    def run_dir(self, study_dir: Path) -> Path:
        return study_dir / "runs" / self.name


def seeds_of(study: StudyConfig) -> list[int]:
    return list(range(study.first_seed, study.first_seed + study.seeds))


def _mix(mix: dict[str, float]) -> str:
    return json.dumps(mix, sort_keys=True)


def variant_overrides(
    study: StudyConfig, variant: str, seed: int, joint: dict[str, Any] | None = None
) -> list[str]:
    """Data and step overrides of one variant (the arm's model overrides come separately).

    `joint` is the seed's data plan entry ({"mix", "steps"}), needed for the joint variant.
    """
    common = ["data.caption_loss=false", f"train.seed={seed}", f"data.seed={seed}"]
    if variant == "text":
        return [*common, f"data.mix={_mix({'text': 1.0})}", f"train.steps={study.text_steps}"]
    if variant == "image":
        return [*common, f"data.mix={_mix(study.image_mix)}", f"train.steps={study.image_steps}"]
    if joint is None:
        raise ValueError("the joint variant needs the data plan's mix and steps")
    return [*common, f"data.mix={_mix(joint['mix'])}", f"train.steps={joint['steps']}"]


def base_config(study: StudyConfig, extra: list[str] | tuple[str, ...] = ()) -> Config:
    return load_config(study.base, [*study.overrides, *extra])


# ------------------------------------------------------------------------- data plan


def stream_tokens(cfg: Config, tok: Any) -> dict[str, Any]:
    """Replay a run's training stream without a model: document tokens produced per kind."""
    from moesaic.data import build_stream

    stream = build_stream(cfg.data, tok, split="train")
    for _ in range(cfg.train.steps * cfg.train.grad_accum):
        next(stream)
    return {"produced": dict(stream.produced), "rows": stream.rows}


def steps_to_cover(cfg: Config, tok: Any, tokens: int) -> int:
    """Optimizer steps after which the stream of `cfg` has produced `tokens` document tokens.

    Mixed rows pack more tightly than unimodal ones (short image documents fill the gaps), so
    the joint run needs slightly fewer steps than text_steps + image_steps to see the same data.
    """
    from moesaic.data import build_stream

    stream = build_stream(cfg.data, tok, split="train")
    batches = 0
    while sum(stream.produced.values()) < tokens:
        next(stream)
        batches += 1
    return max(1, -(-batches // cfg.train.grad_accum))


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tokenizer_for(cfg: Config) -> Any:
    """The tokenizer a run of `cfg` trains with (it depends on data.seed, so on the seed)."""
    from moesaic.data import load_tokenizer
    from moesaic.files import cache_dir

    return load_tokenizer(cfg.data, cache_dir())


PLAN_VERSION = 2


def plan_data(study: StudyConfig, study_dir: Path, log: Callable) -> dict[str, Any]:
    """Per seed: tokens per kind of the unimodal streams → the joint mix and step count.

    The joint mix is the unimodal runs' document tokens per kind; its steps are the fewest
    after which the joint stream has produced as many document tokens as both unimodal streams
    together (at most one step's worth more). Cached in `data-plan.json`.
    """
    path = study_dir / "data-plan.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    plan: dict[str, Any] = {}
    for seed in seeds_of(study):
        old = cached.get(str(seed), {})
        per = {}
        tok = tokenizer_for(base_config(study, variant_overrides(study, "text", seed)))
        for variant in ("text", "image"):
            cfg = base_config(study, variant_overrides(study, variant, seed))
            key = _key(PLAN_VERSION, cfg.data.__dict__, cfg.train.steps, cfg.train.grad_accum)
            if old.get(variant, {}).get("key") == key:
                per[variant] = old[variant]
                continue
            log(f"planning data: replaying the {variant}-only stream of seed {seed}")
            per[variant] = {"key": key, **stream_tokens(cfg, tok)}
        produced = {**per["text"]["produced"], **per["image"]["produced"]}
        joint = {"mix": {k: float(v) for k, v in sorted(produced.items())}}
        cfg = base_config(study, variant_overrides(study, "joint", seed, {**joint, "steps": 1}))
        key = _key(PLAN_VERSION, cfg.data.__dict__, cfg.train.grad_accum)
        if old.get("joint", {}).get("key") == key:
            joint = old["joint"]
        else:
            log(f"planning data: steps of the joint run of seed {seed}")
            joint |= {"key": key, "steps": steps_to_cover(cfg, tok, sum(produced.values()))}
        plan[str(seed)] = {**per, "joint": joint}
    atomic_write_text(path, json.dumps({**cached, **plan}, indent=1))
    return plan


# ------------------------------------------------------------------------- runs


def plan_runs(study: StudyConfig, data_plan: dict[str, Any]) -> list[RunSpec]:
    """Every run of the study, seed-major (a complete first seed comes first)."""
    specs = []
    for seed in seeds_of(study):
        joint = data_plan[str(seed)]["joint"]
        for arm_name in study.arms:
            arm = get_arm(arm_name)
            arm_over = arm.overrides(study.experts, study.granularity)
            if arm_name in study.lr:
                arm_over.append(f"train.lr={study.lr[arm_name]}")
            for variant in VARIANTS:
                name = f"{arm_name}-{variant}-s{seed}"
                over = [*arm_over, *variant_overrides(study, variant, seed, joint)]
                specs.append(RunSpec(arm_name, variant, seed, name, tuple(over)))
    return specs


def run_config(study: StudyConfig, spec: RunSpec, study_dir: Path) -> Config:
    return base_config(study, [*spec.overrides, f"name={spec.name}", f"out={study_dir / 'runs'}"])


def fingerprint(cfg: Config, vocab_size: int) -> str:
    """The Trainer's fingerprint of a run config (model dims resolved as the Trainer does)."""
    from moesaic.runconfig import config_fingerprint, resolve_model_dims

    return config_fingerprint(resolve_model_dims(cfg, vocab_size))


def _check_same_run(cfg: Config, run_dir: Path, vocab_size: int) -> None:
    from moesaic.runconfig import config_fingerprint

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
            summary = Trainer(cfg, run_dir, resume=True).run()
            return summary, "resumed"
        shutil.rmtree(run_dir)  # started but never checkpointed: nothing to keep
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"'{run_dir}' exists but is not a moesaic run; move it away")
    summary = Trainer(cfg, run_dir).run()
    return summary, "trained"


def joint_coverage(study_dir: Path, data_plan: dict, seed: int, arm: str) -> dict | None:
    """Document tokens per kind the joint run actually consumed ÷ the unimodal runs'."""
    from moesaic.train.dist_checkpoint import latest_any_checkpoint

    found, _ = latest_any_checkpoint(study_dir / "runs" / f"{arm}-joint-s{seed}" / "checkpoints")
    if found is None:
        return None
    seen = found.state["data"]["produced"]
    plan = data_plan[str(seed)]
    want = {**plan["text"]["produced"], **plan["image"]["produced"]}
    return {
        "joint_tokens": seen,
        "unimodal_tokens": want,
        "ratio": {k: seen.get(k, 0) / v for k, v in want.items() if v},
    }


# ------------------------------------------------------------------------- task metrics


# Tasks with a meaning for each variant: the image-only run also learns to generate from
# captions (the reference for text-to-image); captioning and VQA need both modalities.
VARIANT_TASKS = {"text": (), "image": ("t2i",), "joint": ("caption", "t2i", "vqa")}


def task_metrics(run_dir: Path, variant: str, enabled: bool, n: int) -> dict[str, float]:
    """Task scores of a finished run via `moesaic.evaluate.tasks` (cached in tasks.json).

    Calls `run_tasks(loaded_run, tasks=VARIANT_TASKS[variant], n=n)` (flat {name: value});
    {} when disabled, when the variant has no meaningful task, or when the module is absent.
    """
    tasks = VARIANT_TASKS[variant]
    if not enabled or not tasks:
        return {}
    path = run_dir / "tasks.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("n") == n and cached.get("tasks") == list(tasks):
            return cached["metrics"]
    import importlib

    try:
        module = importlib.import_module("moesaic.evaluate.tasks")
    except ModuleNotFoundError as e:
        if e.name == "moesaic.evaluate.tasks":
            return {}
        raise
    from moesaic.train.runs import load_run

    raw = module.run_tasks(load_run(run_dir), tasks=tasks, n=n)
    metrics = {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    atomic_write_text(
        path, json.dumps({"n": n, "tasks": list(tasks), "metrics": metrics}, indent=1)
    )
    return metrics


# ------------------------------------------------------------------------- the study


def run_study(
    study: StudyConfig, out: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every missing run, evaluate, analyse, write summary.json and report.html."""
    from moesaic.experiments.summary import build_summary, write_outputs

    study_dir = Path(out) / study.name
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(study_dir / "study.json", json.dumps(dataclasses.asdict(study), indent=1))
    data_plan = plan_data(study, study_dir, log)
    specs = plan_runs(study, data_plan)
    summaries, tasks = train_all(study, study_dir, specs, log)
    analyses: dict[str, dict[str, Any]] = {}
    if study.analyze:
        analyses = analyze_joint_runs(study, study_dir, log)
    return write_outputs(
        build_summary(study, study_dir, specs, summaries, tasks, analyses, data_plan),
        study_dir,
        analyses,
    )


def _run_one(
    study: StudyConfig, study_dir: Path, spec: RunSpec
) -> tuple[dict[str, Any], dict[str, float], str, float]:
    """Train / resume / reuse one run and its task metrics (also a worker-process entry)."""
    t0 = time.perf_counter()
    run_dir = spec.run_dir(study_dir)
    cfg = run_config(study, spec, study_dir)
    summary, how = ensure_run(cfg, run_dir)
    finished = summary.get("status") == "finished"
    tasks = task_metrics(run_dir, spec.variant, study.tasks and finished, study.task_examples)
    return summary, tasks, how, time.perf_counter() - t0


def train_all(
    study: StudyConfig, study_dir: Path, specs: list[RunSpec], log: Callable
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """Every run, `study.jobs` at a time (runs are independent: the joint mix is planned)."""
    summaries: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, float]] = {}
    done = 0

    def record(spec: RunSpec, result: tuple) -> None:
        nonlocal done
        summary, task_values, how, seconds = result
        done += 1
        if summary.get("status") != "finished":
            raise StudyInterrupted(
                f"stopped during {spec.name} (checkpoint saved); run the same command again "
                "to continue the study"
            )
        summaries[spec.name], tasks[spec.name] = summary, task_values
        losses = summary.get("eval", {})
        shown = ", ".join(
            f"{k}={losses[k]:.4f}" for k in ("text/text", "image/image") if k in losses
        )
        log(f"[{done}/{len(specs)}] {spec.name}: {how} ({seconds:.0f} s) {shown}")

    if study.jobs <= 1:
        for spec in specs:
            record(spec, _run_one(study, study_dir, spec))
        return summaries, tasks
    import functools

    from moesaic.experiments.workers import run_parallel

    try:
        run_parallel(functools.partial(_run_one, study, study_dir), specs, study.jobs, record)
    except KeyboardInterrupt:
        raise StudyInterrupted(
            "study interrupted (running runs saved a checkpoint); run the same command "
            "again to continue"
        ) from None
    return summaries, tasks


def analyze_joint_runs(study: StudyConfig, study_dir: Path, log: Callable) -> dict[str, Any]:
    """Specialisation + sparsity of each arm's joint run of the first seed (cached)."""
    from moesaic.analysis.runs import analyze_run
    from moesaic.report.plots import save_analysis_figures

    out = {}
    seed = study.first_seed
    for arm in study.arms:
        run_dir = study_dir / "runs" / f"{arm}-joint-s{seed}"
        path = run_dir / "analysis.json"
        summary = json.loads((run_dir / "summary.json").read_text())
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached.get("step") == summary.get("step") and (
                cached.get("tokens") == study.analyze_tokens
            ):
                out[arm] = cached
                continue
        log(f"analysing {run_dir.name}")
        out[arm] = analyze_run(run_dir, tokens=study.analyze_tokens)
        save_analysis_figures(out[arm], run_dir / "analysis", title=run_dir.name)
    return out

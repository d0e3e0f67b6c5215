"""`moesaic eval RUN_DIR [--tasks caption,t2i,vqa,world --n 500]`: held-out per-modality losses
of a run's latest checkpoint and, with `--tasks`, task accuracy (`moesaic.evaluate.tasks`), with
the chance level of each score next to it (and, for `world`, the copy-the-previous-frame
baseline). Writes RUN_DIR/eval.json, which also says where each eval set came from
(`eval_sources`: source, reader, paths, split, held-out records, documents in the eval
batches)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moesaic.files import atomic_write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    p.add_argument("--batches", type=int, default=None, help="eval batches per set")
    p.add_argument("--tasks", default=None, help="comma-separated: caption,t2i,vqa,world")
    p.add_argument("--n", type=int, default=500, help="held-out examples per task")
    p.add_argument(
        "--split",
        default="test",
        choices=("test", "val", "train"),
        help="world split of the task examples",
    )
    p.add_argument("--seed", type=int, default=None, help="task seed (default: eval.seed)")
    p.add_argument("--steps", type=int, default=25, help="Euler steps for text-to-image")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale for text-to-image")
    p.add_argument("--world-steps", type=int, default=3, help="actions per world rollout")
    p.add_argument(
        "--sampler", default="euler", choices=("euler", "stochastic"),
        help="flow sampler for text-to-image and world rollouts",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def run(args: argparse.Namespace) -> int:
    from moesaic.evaluate.losses import eval_losses
    from moesaic.train.runs import load_run
    from moesaic.train.runtime import autocast_factory, set_threads

    tasks = None
    if args.tasks is not None:
        from moesaic.evaluate.tasks import check_tasks

        tasks = check_tasks([t.strip() for t in args.tasks.split(",") if t.strip()])
    run = load_run(Path(args.run_dir), args.device)
    set_threads(run.cfg.train)
    for why in run.skipped:
        print(f"warning: skipped a newer checkpoint: {why}")
    print(f"evaluating {run.checkpoint} (step {run.step})")
    sets = run.eval_sets(args.batches)
    factory = autocast_factory(run.cfg.train, run.device)
    result = {
        "step": run.step,
        "checkpoint": str(run.checkpoint),
        "skipped_checkpoints": list(run.skipped),
        "losses": eval_losses(run.model, sets, run.device, factory),
        "eval_sources": sets.sources,
    }
    if tasks:
        result |= _task_results(run, tasks, args)
    out = Path(args.run_dir) / "eval.json"
    atomic_write_text(out, json.dumps(result, indent=1))
    for key, value in result["losses"].items():
        print(f"{key:24s} {value:.4f}")
    for name, origin in sets.sources.items():
        print(f"{name:24s} {describe_origin(origin)}")
    chance, copy = result.get("chance", {}), result.get("copy", {})
    for key, value in result.get("tasks", {}).items():
        extra = f"   (chance {chance[key]:.4f}" if key in chance else ""
        extra += f", copy {copy[key]:.4f})" if key in copy else (")" if extra else "")
        print(f"{key:32s} {value:.4f}{extra}")
    print(f"wrote {out}")
    return 0


def _task_results(run, tasks: list[str], args: argparse.Namespace) -> dict:
    from moesaic.evaluate.sampling import ImageSampling, TextSampling
    from moesaic.evaluate.tasks import chance_levels, run_tasks

    seed = run.cfg.eval.seed if args.seed is None else args.seed
    image_opts = ImageSampling(
        steps=args.steps, cfg_scale=args.cfg, seed=seed, sampler=args.sampler
    )
    scores = run_tasks(
        run, tasks, args.n, seed, args.split, image_opts, TextSampling(seed=seed),
        world_steps=args.world_steps,
    )  # fmt: skip
    out = {
        "tasks": scores,
        "task_options": {
            "tasks": tasks, "n": args.n, "split": args.split, "seed": seed,
            "steps": args.steps, "cfg": args.cfg, "decoding": "greedy",
            "world_steps": args.world_steps, "world_cfg": None, "sampler": args.sampler,
        },
    }  # fmt: skip
    if run.cfg.data.world_only:
        chance = chance_levels(args.n, seed, args.split, run.cfg.data.caption_register)
        if "world" in tasks:
            from moesaic.evaluate.world_model import world_baselines

            base = world_baselines(args.n, seed, args.split, args.world_steps)
            chance |= base["random"]
            out["copy"] = base["copy"]
        out["chance"] = {k: v for k, v in chance.items() if k in scores}
    return out


def describe_origin(origin: dict) -> str:
    """One line for an eval set's provenance: `source (reader, split: N records), …; D docs`."""
    parts = []
    for o in origin["from"]:
        held = "generated" if o["records"] is None else f"{o['records']} records"
        if o["records"] is None and o["reader"] == "webdataset":
            held = "streamed"
        parts.append(f"{o['source']} ({o['reader']}, {o['split']}: {held})")
    return f"{'; '.join(parts)}; {origin['documents']} documents in the eval batches"

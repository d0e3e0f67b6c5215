"""Presets of the modality-tax study: `smoke` (seconds), `quick` (`make demo`), `paper` (GPU)."""

from __future__ import annotations

from typing import Any

MICRO_MODEL = [
    "model.dim=32",
    "model.layers=2",
    "model.heads=2",
    "model.ffn.hidden=64",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.vocab_size=512",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds: exercises every stage end to end (used by the tests); numbers are noise.
    "smoke": {
        "name": "compete-smoke",
        "base": "tiny",
        "overrides": [
            *MICRO_MODEL,
            "train.warmup=2",
            "train.threads=1",
            "train.checkpoint_every=0",
            "eval.every=4",
            "eval.batches=2",
            "logging.every=2",
            "logging.progress=none",
        ],
        "steps": 6,
        "experts": 8,
        "granularity": 2,
        "description": "end-to-end check of the study machinery; losses are not meaningful",
    },
    # Minutes on 2 CPU cores (`make demo`): a 4-layer, 32-wide model on a world with a
    # knowledge base and busier scenes, chosen by the search in docs/study.md.
    "quick": {
        "name": "compete-quick",
        "base": "tiny",
        "overrides": [
            "model.dim=32",
            "model.layers=4",
            "model.heads=2",
            "model.ffn.hidden=128",
            "model.ffn.z_loss=1e-4",
            "data.seq_len=128",
            "data.batch_size=8",
            "data.vocab_size=1024",
            "data.knowledge.entities=100",
            "data.knowledge.share=0.5",
            "data.max_objects=6",
            "train.lr=3e-3",
            "train.warmup=30",
            "train.threads=1",
            "train.checkpoint_every=100",
            "eval.every=0",
            "eval.batches=8",
            "logging.every=10",
            "logging.progress=none",
        ],
        "arms": ["dense", "modality", "moe", "moe-total-matched"],
        "seeds": 5,
        "steps": 250,
        "experts": 16,
        "granularity": 4,
        "jobs": 2,
        "description": "CPU-sized study: every arm's tax on the built-in world with a knowledge "
        "base, 5 seeds",
    },
    # One GPU, hours (documented, not run in CI): the `small` preset (12 × 768, 32×32 images).
    "paper": {
        "name": "compete-paper",
        "base": "small",
        "overrides": ["model.ffn.z_loss=1e-4", "eval.every=1000", "logging.progress=plain"],
        "arms": ["dense", "modality", "moe", "moe-total-matched", "moe-shared-per-modality"],
        "seeds": 3,
        "steps": 10000,
        "experts": 64,
        "granularity": 4,
        "analyze_tokens": "all",
        "tasks": True,
        "task_examples": 500,
        "description": "GPU scale: small preset, 64 experts of width F/4, 3 seeds",
    },
}

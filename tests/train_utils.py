"""A micro configuration of the tiny preset, small enough for many runs per test session."""

MICRO = [
    "model.dim=32",
    "model.layers=2",
    "model.heads=2",
    "model.ffn.hidden=64",
    "data.seq_len=64",
    "data.batch_size=2",
    "data.vocab_size=512",
    "eval.batches=1",
    "logging.progress=none",
    "logging.every=1",
]
MOE = ["model.ffn.kind=moe", "model.ffn.experts=8", "model.ffn.granularity=2"]
KINDS = {
    "dense": [],
    "modality": ["model.ffn.kind=modality"],
    "moe": MOE,
    "moe-bias": MOE + ["model.ffn.bias_rate=0.01", "model.ffn.shared=per_modality"],
}

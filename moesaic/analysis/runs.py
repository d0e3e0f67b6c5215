"""`analyze_run`: expert specialisation and activation sparsity of a trained run.

The run's fixed eval sets (`build_eval_sets`: in-distribution text, OOD text, caption→image,
image→caption) are passed through the model once each, with routing counters reset per set:

* specialisation uses the counters summed over all sets (both modalities, both image-text
  directions); the flow-time CV uses the caption→image set alone, whose images are noised on a
  fixed grid of flow times (clean images of image→caption documents would otherwise fill the
  last time bin);
* sparsity uses the residual stream after each block (`output_hidden_states=True`) at the text
  positions of the text sets and the image positions of the image set — every such position
  (`tokens="all"`) or the last one of each document's run of such positions (`tokens="last"`,
  e.g. the final token of a text document, the last patch of an image).

Writes `RUN_DIR/analysis.json`; the figures are drawn by `report/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moesaic.analysis import sparsity
from moesaic.analysis.specialization import routing_specialization, time_cv_per_expert
from moesaic.batch import Batch, DocKind, Modality
from moesaic.errors import ConfigError
from moesaic.files import atomic_write_text
from moesaic.jsonsafe import json_safe
from moesaic.train.runs import load_run

# eval set -> modality whose hidden vectors are measured
SPARSITY_SETS = {"text": Modality.TEXT, "ood_text": Modality.TEXT, "image": Modality.IMAGE}


def select_positions(batch: Batch, modality: int, tokens: str) -> torch.Tensor:
    """Bool [B, L]: non-padding positions of `modality`; with "last" only the last position of
    each contiguous run of them inside one document."""
    mask = (batch.modality == modality) & (batch.doc_kind != DocKind.PAD)
    if tokens == "all":
        return mask
    if tokens != "last":
        raise ConfigError(f"tokens='{tokens}' must be 'last' or 'all'")
    nxt = torch.zeros_like(mask)
    nxt[:, :-1] = mask[:, 1:] & (batch.doc_id[:, 1:] == batch.doc_id[:, :-1])
    return mask & ~nxt


def _routing_to_lists(stats: dict[int, dict[str, torch.Tensor]]) -> dict[str, dict[str, list]]:
    return {str(i): {k: v.tolist() for k, v in s.items()} for i, s in stats.items()}


def _add_routing(acc: dict[str, dict[str, Any]], stats: dict[int, dict[str, torch.Tensor]]):
    for i, s in stats.items():
        slot = acc.setdefault(str(i), {})
        for k, v in s.items():
            slot[k] = slot[k] + v.cpu() if k in slot else v.cpu().clone()


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    sets: dict[str, list[Batch]],
    device: torch.device | str = "cpu",
    tokens: str = "last",
) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[dict[str, float]]]]:
    """(routing summed over sets, routing per set, sparsity per set per layer)."""
    model.eval()
    total: dict[str, dict[str, torch.Tensor]] = {}
    per_set: dict[str, Any] = {}
    sparse: dict[str, list[dict[str, float]]] = {}
    has_moe = hasattr(model, "routing_stats")
    for name, batches in sets.items():
        if has_moe:
            model.reset_routing_stats()
        vectors: list[list[torch.Tensor]] = []
        for batch in batches:
            batch = batch.to(device)
            out = model(batch, output_hidden_states=name in SPARSITY_SETS)
            if name not in SPARSITY_SETS:
                continue
            sel = select_positions(batch, int(SPARSITY_SETS[name]), tokens)
            if not vectors:
                vectors = [[] for _ in out.hidden_states]
            for layer, h_BLD in enumerate(out.hidden_states):
                vectors[layer].append(h_BLD[sel].float().cpu())
        if vectors:
            sparse[name] = [sparsity.summarize(torch.cat(v)) for v in vectors]
        if has_moe:
            stats = model.routing_stats()
            per_set[name] = stats
            _add_routing(total, stats)
    if has_moe:
        model.reset_routing_stats()
    return total, per_set, sparse


def analyze_loaded(run: Any, batches: int | None = None, tokens: str = "last") -> dict[str, Any]:
    """Specialisation + sparsity of a `moesaic.train.runs.LoadedRun`."""
    sets = run.eval_sets(batches)
    with run.autocast():
        total, per_set, sparse = collect(run.model, sets, run.device, tokens)
    ffn = run.cfg.model.ffn
    result: dict[str, Any] = {
        "run": str(run.run_dir),
        "step": run.step,
        "ffn": {
            "kind": ffn.kind,
            "experts": ffn.experts,
            "granularity": ffn.granularity,
            "shared": ffn.shared,
            "groups": ffn.groups,
        },
        "eval_batches": batches or run.cfg.eval.batches,
        "tokens": tokens,
        "specialization": None,
        "sparsity": {"sets": sparse},
    }
    if "text" in sparse and "ood_text" in sparse:
        result["sparsity"]["ood_minus_id"] = sparsity.compare(sparse, "text", "ood_text")
    if total:
        k = ffn.routed_experts if ffn.kind == "moe" else None
        spec = routing_specialization(total, k)
        gen = per_set.get("image")
        if gen is not None:
            for layer, s in gen.items():
                cv = time_cv_per_expert(s["time"])
                entry = spec["layers"][str(layer)]
                entry["time_cv"] = _mean(cv)
                img = [c for c, si in zip(cv, entry["S"], strict=True) if si < -0.5]
                entry["time_cv_image_experts"] = _mean(img)
            for key in ("time_cv", "time_cv_image_experts"):
                spec["overall"][key] = _mean([v[key] for v in spec["layers"].values()])
        spec["routing"] = _routing_to_lists({int(i): v for i, v in total.items()})
        result["specialization"] = spec
    return result


def _mean(values: Any) -> float:
    vals = [float(v) for v in values if v is not None and float(v) == float(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def write_analysis(run_dir: Path, result: dict[str, Any]) -> Path:
    """Write `RUN_DIR/analysis.json` (NaN/inf as null)."""
    path = Path(run_dir) / "analysis.json"
    atomic_write_text(path, json.dumps(json_safe(result), indent=1, allow_nan=False))
    return path


def analyze_run(
    run_dir: str | Path, batches: int | None = None, tokens: str = "last", device: str = "auto"
) -> dict[str, Any]:
    """Load the run's latest checkpoint, analyse it, write analysis.json; returns the result
    (JSON-safe). Figures are drawn by `moesaic.report.plots.save_analysis_figures`."""
    run = load_run(Path(run_dir), device)
    result = json_safe(analyze_loaded(run, batches, tokens))
    write_analysis(Path(run_dir), result)
    return result

"""Expert specialisation from routing counters (design.md §5).

Input per MoE layer: the counters of `Transformer.routing_stats()` (or the "routing" field of
an eval record in metrics.jsonl, the same numbers as nested lists):

    "modality" [2, E]   routed assignments of text (row 0) / image (row 1) tokens per expert
    "tokens"   [2]      routed tokens per modality N_m (padding excluded)
    "doc_kind" [5, E]   assignments per DocKind (TEXT, CAPTION_IMAGE, IMAGE_CAPTION, IMAGE, PAD)
    "time"     [10, E]  image-token assignments per flow-time bin (t ∈ [0, 1], 10 equal bins)

and k, the routed experts per token (every routed token makes exactly k assignments, so k is
also recovered as Σ_E C / Σ N when not given).

Definitions (per layer):

* `R_m = C_m / (N_m · k)`: the share of modality m's assignments that expert i receives.
  `S_i = (R_text − R_image) / (R_text + R_image)` ∈ [−1, 1]. S is NaN — and the expert is left
  out of every class count and fraction — when the expert received no assignment at all
  (R_text + R_image = 0), and for every expert when either modality has no routed tokens
  (N_m = 0: a unimodal run says nothing about specialisation).
* Classes: text (S > 0.5), image (S < −0.5), shared (otherwise); fractions are over the
  experts with a defined S.
* The null (`null_fractions`): the class fractions a modality-blind router would give at the
  same token shares and the same expert load. Each modality's N_m·k assignments are drawn from
  one multinomial over the experts with the layer's observed load p_i = C_i / Σ C, S and the
  classes computed as above, averaged over `NULL_DRAWS` seeded draws. Finite counts alone make
  some experts look specialised; the fractions above the null are what routing learned.
* Routing entropy: H(p) in nats of the load p_i = C_i / Σ C over all tokens, and H / log E
  (1 = perfectly even); also per modality.
* Load: max_i C_i / mean_i C_i (1 = perfectly balanced, E = everything on one expert).
* Understanding vs generation: Pearson r between the expert-usage vectors (shares) of
  IMAGE_CAPTION documents (image → text) and CAPTION_IMAGE documents (text → image), over all
  non-padding tokens of those documents; NaN when a vector is empty or constant.
* Flow-time CV: for each non-empty time bin b, the share q_ib = time[b, i] / Σ_j time[b, j] of
  the bin's image assignments that expert i receives; per expert CV_i = std_b(q_ib) /
  mean_b(q_ib) (population std over the non-empty bins, experts with mean share > 0); the layer
  value is the mean of CV_i over those experts ("time_cv"), and over the image experts only
  (S < −0.5, "time_cv_image_experts"). 0 = usage independent of flow time. Needs ≥ 2 non-empty
  bins (else NaN). Note that clean images of image→caption documents fall in the last bin; for
  a pure generation measurement count routing on caption→image batches only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from moesaic.batch import DocKind, Modality

TEXT_THRESHOLD = 0.5
IMAGE_THRESHOLD = -0.5
NULL_DRAWS = 200


def _arr(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def infer_k(stats: Mapping[str, Any]) -> float:
    """Routed experts per token, Σ assignments / Σ routed tokens (NaN with no tokens)."""
    tokens = _arr(stats["tokens"]).sum()
    return float(_arr(stats["modality"]).sum() / tokens) if tokens > 0 else float("nan")


def modality_ratios(modality_2E: Any, tokens_2: Any, k: float) -> np.ndarray:
    """R [2, E]: R_m,i = C_m,i / (N_m · k); rows of a modality with N_m = 0 are NaN."""
    c = _arr(modality_2E)
    n = _arr(tokens_2)
    out = np.full_like(c, np.nan)
    for m in range(c.shape[0]):
        if n[m] > 0 and k > 0:
            out[m] = c[m] / (n[m] * k)
    return out


def specialization_scores(modality_2E: Any, tokens_2: Any, k: float) -> np.ndarray:
    """S [E] ∈ [−1, 1] (NaN for unused experts, or for all when a modality has no tokens)."""
    r = modality_ratios(modality_2E, tokens_2, k)
    rt, ri = r[int(Modality.TEXT)], r[int(Modality.IMAGE)]
    total = rt + ri
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (rt - ri) / total
    s[~(total > 0)] = np.nan
    return s


def classify(s_E: np.ndarray) -> dict[str, Any]:
    """Counts and fractions of text / image / shared experts among those with a defined S."""
    s = np.asarray(s_E, dtype=np.float64)
    defined = np.isfinite(s)
    n = int(defined.sum())
    counts = {
        "text": int((s[defined] > TEXT_THRESHOLD).sum()),
        "image": int((s[defined] < IMAGE_THRESHOLD).sum()),
    }
    counts["shared"] = n - counts["text"] - counts["image"]
    fractions = {c: (v / n if n else float("nan")) for c, v in counts.items()}
    return {"counts": counts, "fractions": fractions, "unused": int((~defined).sum())}


def null_fractions(
    modality_2E: Any, tokens_2: Any, k: float, draws: int = NULL_DRAWS, seed: int = 0
) -> dict[str, float]:
    """Mean class fractions under modality-blind routing at the same load and token shares."""
    c = _arr(modality_2E)
    n = _arr(tokens_2)
    load = c.sum(axis=0)
    if load.sum() <= 0 or not (n > 0).all() or not k > 0:
        return {cls: float("nan") for cls in ("text", "image", "shared")}
    p = load / load.sum()
    rng = np.random.default_rng(seed)
    totals = {"text": 0.0, "image": 0.0, "shared": 0.0}
    for _ in range(draws):
        sim = np.stack([rng.multinomial(int(round(n_m * k)), p) for n_m in n])
        frac = classify(specialization_scores(sim, n, k))["fractions"]
        for cls in totals:
            totals[cls] += frac[cls] / draws
    return totals


def entropy(counts_E: Any) -> tuple[float, float]:
    """(H in nats, H / log E) of the distribution counts / Σ counts; NaN when empty."""
    c = _arr(counts_E)
    total = c.sum()
    if total <= 0:
        return float("nan"), float("nan")
    p = c[c > 0] / total
    h = float(-(p * np.log(p)).sum())
    e = c.shape[-1]
    return h, (h / math.log(e) if e > 1 else float("nan"))


def load_ratio(counts_E: Any) -> float:
    """max_i C_i / mean_i C_i (1 = balanced); NaN with no assignments."""
    c = _arr(counts_E)
    mean = c.mean()
    return float(c.max() / mean) if mean > 0 else float("nan")


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation; NaN when either vector is constant."""
    x, y = _arr(a), _arr(b)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def understanding_generation_corr(doc_kind_KE: Any) -> float:
    """Pearson r of expert shares between image→text and text→image documents."""
    d = _arr(doc_kind_KE)
    und, gen = d[int(DocKind.IMAGE_CAPTION)], d[int(DocKind.CAPTION_IMAGE)]
    if und.sum() <= 0 or gen.sum() <= 0:
        return float("nan")
    return pearson(und / und.sum(), gen / gen.sum())


def time_cv_per_expert(time_BE: Any) -> np.ndarray:
    """CV_i [E] of expert i's share of each non-empty flow-time bin (NaN: no image usage)."""
    t = _arr(time_BE)
    totals = t.sum(axis=1)
    used = totals > 0
    out = np.full(t.shape[1], np.nan)
    if used.sum() < 2:
        return out
    q = t[used] / totals[used, None]  # [bins_used, E]
    mean = q.mean(axis=0)
    std = q.std(axis=0)
    ok = mean > 0
    out[ok] = std[ok] / mean[ok]
    return out


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else float("nan")


def layer_specialization(stats: Mapping[str, Any], k: float | None = None) -> dict[str, Any]:
    """All per-layer metrics of the module docstring for one MoE layer's counters."""
    k_val = infer_k(stats) if k is None else float(k)
    modality = _arr(stats["modality"])
    s = specialization_scores(modality, stats["tokens"], k_val)
    classes = classify(s)
    load_E = modality.sum(axis=0)
    h, h_norm = entropy(load_E)
    per_mod = {}
    for m in Modality:
        if m >= modality.shape[0]:
            continue
        hm, hm_norm = entropy(modality[int(m)])
        per_mod[m.name.lower()] = {
            "entropy": hm,
            "entropy_norm": hm_norm,
            "max_mean_load": load_ratio(modality[int(m)]),
        }
    cv_E = time_cv_per_expert(stats["time"]) if "time" in stats else np.full(s.shape, np.nan)
    image_experts = np.isfinite(s) & (s < IMAGE_THRESHOLD)
    return {
        "k": k_val,
        "experts": int(s.shape[0]),
        "S": s.tolist(),
        "classes": classes,
        "null_fractions": null_fractions(modality, stats["tokens"], k_val),
        "load": (load_E / load_E.sum()).tolist() if load_E.sum() > 0 else load_E.tolist(),
        "entropy": h,
        "entropy_norm": h_norm,
        "max_mean_load": load_ratio(load_E),
        "per_modality": per_mod,
        "understanding_generation_r": (
            understanding_generation_corr(stats["doc_kind"]) if "doc_kind" in stats else math.nan
        ),
        "time_cv": _nanmean(cv_E),
        "time_cv_image_experts": _nanmean(cv_E[image_experts]),
    }


def routing_specialization(
    routing: Mapping[Any, Mapping[str, Any]], k: float | None = None
) -> dict[str, Any]:
    """Per-layer metrics (keyed by block index, as str) plus means over layers ("overall")."""
    layers = {
        str(layer): layer_specialization(stats, k)
        for layer, stats in sorted(routing.items(), key=lambda kv: int(kv[0]))
    }
    overall: dict[str, Any] = {}
    if layers:
        for key in (
            "entropy_norm",
            "max_mean_load",
            "understanding_generation_r",
            "time_cv",
            "time_cv_image_experts",
        ):
            overall[key] = _nanmean(np.array([v[key] for v in layers.values()]))
        for c in ("text", "image", "shared"):
            overall[f"fraction_{c}"] = _nanmean(
                np.array([v["classes"]["fractions"][c] for v in layers.values()])
            )
            overall[f"null_fraction_{c}"] = _nanmean(
                np.array([v["null_fractions"][c] for v in layers.values()])
            )
    return {"layers": layers, "overall": overall}


def specialization_matrix(spec: Mapping[str, Any]) -> tuple[list[int], np.ndarray]:
    """(layer indices, S [layers, E_max]) from `routing_specialization` output (NaN-padded)."""
    layers = sorted(spec["layers"], key=int)
    if not layers:
        return [], np.zeros((0, 0))
    e_max = max(len(spec["layers"][i]["S"]) for i in layers)
    mat = np.full((len(layers), e_max), np.nan)
    for row, i in enumerate(layers):
        s = np.array([np.nan if v is None else v for v in spec["layers"][i]["S"]], dtype=float)
        mat[row, : s.shape[0]] = s
    return [int(i) for i in layers], mat

"""`moesaic bench moe`: one MoE layer, forward + backward, against a FLOP-matched dense FFN.

Every implementation runs the same layer — same router weights, same expert weights, same
input and output gradient — in this process:

* `dense`: moesaic's SwiGLU FFN of width k·F (the FLOPs of k experts of width F): the
  reference every ratio is taken against;
* `moesaic`: the MoE layer as configured by default (`dispatch: auto`), and each dispatch
  backend forced (`moesaic-native`, `moesaic-grouped`, `moesaic-split`);
* `hf-eager`, `hf-grouped`: Hugging Face transformers' Qwen3-MoE sparse block with its expert
  implementations (when transformers is installed), after checking that its output equals
  moesaic's;
* `split-loop` (per-expert boolean-mask loop) and `one-hot` (capacity-factor one-hot einsums),
  the classic small-codebase formulations (`moe_peers.py`).

MoE times include the router (and moesaic's balancing loss and routing statistics, which the
peers do not compute). Measurements are interleaved: every round times each implementation once,
in a rotating order, so that load from other processes hits all of them alike; figures are
medians over rounds. `cpu_ms` is the process CPU time of the same calls (all threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from moesaic.bench import moe_peers as peers
from moesaic.bench import openmp
from moesaic.config import FFNConfig
from moesaic.errors import ConfigError
from moesaic.model import native
from moesaic.model.ffn import DenseFFN, TokenMeta
from moesaic.model.moe import MoE
from moesaic.train.malloc import retain_freed_memory


@dataclasses.dataclass(frozen=True)
class Shape:
    """E experts of width F, top-k, model width D, T tokens (dense width k·F)."""

    name: str
    experts: int
    top_k: int
    expert_hidden: int
    dim: int
    tokens: int


SHAPES = {
    "coarse": Shape("coarse", 8, 2, 512, 256, 2048),
    "fine": Shape("fine", 64, 8, 64, 256, 2048),
    "large": Shape("large", 64, 8, 64, 256, 16384),
}
IMPLS = ("dense", "moesaic", "moesaic-native", "moesaic-grouped", "moesaic-split",
         "hf-eager", "hf-grouped", "split-loop", "one-hot")  # fmt: skip
MOESAIC_BACKENDS = {"moesaic": "auto", "moesaic-native": "native", "moesaic-grouped": "grouped_mm",
                    "moesaic-split": "split"}  # fmt: skip
ONE_HOT_MAX_BYTES = 2**30  # one-hot dispatch/combine tensors larger than this are not run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default="coarse,fine,large", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help="implementations to time")
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (0: 15, quick 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0 = default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="skip an implementation whose warm-up call takes longer (0: 30 s, quick 1 s)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds of timed rounds per shape; rounds stop once it is spent (at least 3)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="coarse and fine at 512 tokens, dense/moesaic/HF only, 3 rounds (< 1 minute)",
    )
    openmp.add_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")


QUICK_IMPLS = ("dense", "moesaic", "hf-eager", "hf-grouped")
QUICK_TOKENS = 512
PARITY_TOKENS = 256


def _meta(T: int, device: torch.device) -> TokenMeta:
    zeros = torch.zeros(T, dtype=torch.int64, device=device)
    ones = torch.ones(T, device=device)
    return TokenMeta(zeros, zeros, ones, torch.ones(T, dtype=torch.bool, device=device))


def build_moe(shape: Shape, backend: str, seed: int) -> MoE:
    """moesaic's layer: softmax router, top-k, renormalised, no shared expert, Switch loss."""
    cfg = FFNConfig(kind="moe", hidden=shape.top_k * shape.expert_hidden,
                    experts=shape.experts, granularity=shape.top_k)  # fmt: skip
    cfg.validate()
    torch.manual_seed(seed)
    moe = MoE(cfg, shape.dim)
    moe.reset_parameters(0.02, 0.02)
    moe.experts.backend = backend
    return moe


def build_impls(
    shape: Shape, names: list[str], device: torch.device, dtype: torch.dtype, seed: int
) -> dict[str, nn.Module]:
    """Each named implementation on the same weights (peers copy the `moesaic` layer's)."""
    moe = build_moe(shape, "auto", seed)
    hf = peers.hf_implementations() if peers.hf_version() else []
    out: dict[str, nn.Module] = {}
    for name in names:
        if name == "dense":
            torch.manual_seed(seed + 1)
            out[name] = DenseFFN(shape.dim, shape.top_k * shape.expert_hidden)
            out[name].reset_parameters(0.02, 0.02)
        elif name == "moesaic-native" and not (device.type == "cpu" and native.available()):
            continue  # the C++ kernel is CPU-only and may not build here
        elif name in MOESAIC_BACKENDS:
            out[name] = build_moe(shape, MOESAIC_BACKENDS[name], seed)
        elif name.startswith("hf-"):
            impl = {"hf-eager": "eager", "hf-grouped": "grouped_mm"}[name]
            if impl in hf:
                out[name] = peers.HFBlock(peers.hf_block(moe, impl))
        elif name == "split-loop":
            out[name] = peers.SplitLoopMoE(moe)
        elif name == "one-hot":
            size = peers.OneHotMoE.memory_bytes(shape.tokens, shape.experts, shape.top_k,
                                                torch.finfo(dtype).bits // 8)  # fmt: skip
            if size <= ONE_HOT_MAX_BYTES:
                out[name] = peers.OneHotMoE(moe)
        else:
            raise ConfigError(f"--impls: unknown implementation '{name}'; pick from {IMPLS}")
    return {n: m.to(device=device, dtype=dtype) for n, m in out.items()}


def step_fn(module: nn.Module, x_TD: Tensor, g_TD: Tensor, meta: TokenMeta) -> Callable[[], Tensor]:
    """One forward + backward (input and weight gradients, fresh as after zero_grad)."""
    params = list(module.parameters())

    def step() -> Tensor:
        for p in params:
            p.grad = None
        x = x_TD.detach().requires_grad_(True)
        out = module(x, meta) if isinstance(module, (MoE, DenseFFN)) else module(x)
        y, aux = out if isinstance(out, tuple) else (out, None)
        if aux is None:
            y.backward(g_TD)
        else:
            torch.autograd.backward([y, aux], [g_TD, torch.ones_like(aux)])
        return y.detach()

    return step


def check_parity(
    impls: dict[str, nn.Module], shape: Shape, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """Max |y − y_moesaic| / max |y_moesaic| of every dropless peer on one input.

    Raises AssertionError above 1e-5 (fp32) or 2e-2 (bf16). The one-hot baseline drops
    assignments past capacity and is not checked.
    """
    ref_name = next((n for n in impls if n in MOESAIC_BACKENDS), None)
    if ref_name is None:
        return {}
    x, _ = _inputs(shape, device, dtype, 1000)
    meta = _meta(shape.tokens, device)
    with torch.no_grad():
        ref = impls[ref_name](x, meta)[0].float()
        scale = ref.abs().max().clamp_min(1e-30)
        errors = {}
        for name, module in impls.items():
            if name in ("dense", "one-hot", ref_name):
                continue
            out = module(x, meta) if isinstance(module, MoE) else module(x)
            y = out[0] if isinstance(out, tuple) else out
            errors[name] = float((y.float() - ref).abs().max() / scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    bad = {n: e for n, e in errors.items() if e > tol}
    if bad:
        raise AssertionError(f"outputs differ from {ref_name} beyond {tol}: {bad}")
    return errors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_impls(
    steps: dict[str, Callable[[], Tensor]],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, str]]:
    """Wall and CPU seconds per call over interleaved rounds; skipped implementations.

    Each round times every implementation once, starting one further along the list each
    round; rounds stop after `--rounds`, or once `--budget` seconds are spent (at least 3), so
    every implementation is timed in the same rounds.
    """
    skipped: dict[str, str] = {}
    for name, step in list(steps.items()):
        for _ in range(max(args.warmup, 1)):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            took = time.perf_counter() - t0
            if took > args.max_seconds and name != "dense":
                skipped[name] = (
                    f"warm-up call took {took:.1f} s > --max-seconds {args.max_seconds:g}"
                )
                del steps[name]
                break
    wall: dict[str, list[float]] = {n: [] for n in steps}
    cpu: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    spent = 0.0
    for r in range(args.rounds):
        if r >= 3 and spent > args.budget:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[name]()
            _sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            spent += wall[name][-1]
    return wall, cpu, skipped


def run_shape(
    shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[list[dict], dict[str, float]]:
    """Parity of the peers on a small input, then interleaved timings at full size."""
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    if "dense" not in names:
        names.insert(0, "dense")
    small = dataclasses.replace(shape, tokens=min(shape.tokens, PARITY_TOKENS))
    parity = check_parity(build_impls(small, names, device, dtype, args.seed), small, device, dtype)
    impls = build_impls(shape, names, device, dtype, args.seed)
    x, g = _inputs(shape, device, dtype, args.seed)
    meta = _meta(shape.tokens, device)
    steps = {n: step_fn(m, x, g, meta) for n, m in impls.items()}
    wall, cpu, skipped = time_impls(steps, args, device)
    for name in names:
        if name not in impls and name not in skipped:
            skipped[name] = _why_absent(name, shape, dtype)
    dense_ms = statistics.median(wall["dense"]) * 1e3
    rows = []
    for name in wall:
        ms = statistics.median(wall[name]) * 1e3
        row = {
            "shape": shape.name,
            "impl": name,
            "ms": ms,
            "ratio_to_dense": ms / dense_ms,
            "cpu_ms": statistics.median(cpu[name]) * 1e3,
            "rounds": len(wall[name]),
            **{k: v for k, v in dataclasses.asdict(shape).items() if k != "name"},
        }
        if name in MOESAIC_BACKENDS:
            row["path"] = moesaic_path(impls[name], x)
        rows.append(row)
    for name, why in skipped.items():
        rows.append({"shape": shape.name, "impl": name, "ms": None, "ratio_to_dense": None,
                     "skipped": why})  # fmt: skip
    return rows, parity


def _inputs(shape: Shape, device, dtype, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(shape.tokens, shape.dim, generator=gen).to(device, dtype)
    g = torch.randn(shape.tokens, shape.dim, generator=gen).to(device, dtype)
    return x, g


def _why_absent(name: str, shape: Shape, dtype: torch.dtype) -> str:
    if name.startswith("hf-"):
        if peers.hf_version() is None:
            return "transformers is not installed (pip install 'moesaic[transformers]')"
        return f"transformers {peers.hf_version()} has no such expert implementation"
    if name == "one-hot":
        size = peers.OneHotMoE.memory_bytes(shape.tokens, shape.experts, shape.top_k,
                                            torch.finfo(dtype).bits // 8)  # fmt: skip
        return f"one-hot dispatch/combine tensors need {size / 2**30:.1f} GiB"
    if name == "moesaic-native":
        try:
            native.load()
        except native.NativeUnavailable as e:
            return str(e)
        return "the C++ expert kernel runs on CPU only"
    return "not available"


def moesaic_path(moe: MoE, x_TD: Tensor) -> str:
    """Which expert path the layer takes on this input: native, grouped_mm or split."""
    return moe.experts.path(x_TD)


def run(args: argparse.Namespace) -> int:
    code = openmp.rerun_if_needed("moe", args.omp_wait_policy)
    if code is not None:
        return code
    if args.rounds <= 0:
        args.rounds = 3 if args.quick else 15
    if args.max_seconds <= 0:
        args.max_seconds = 1.0 if args.quick else 30.0
    if args.quick:
        args.warmup = min(args.warmup, 1)
        asked = [n.strip() for n in args.impls.split(",")]
        args.impls = ",".join(n for n in asked if n in QUICK_IMPLS)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    retained = device.type == "cpu" and retain_freed_memory()
    shape_names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in shape_names:
        if s not in SHAPES:
            raise ConfigError(f"--shapes: unknown shape '{s}'; pick from {', '.join(SHAPES)}")
    shapes = [SHAPES[s] for s in shape_names]
    if args.quick:
        shapes = [dataclasses.replace(s, tokens=QUICK_TOKENS) for s in shapes if s.name != "large"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{openmp.current()}, {str(dtype).removeprefix('torch.')} on {device}"
          f"{', freed memory retained' if retained else ''}\n")  # fmt: skip
    rows, parity = [], {}
    for shape in shapes:
        shape_rows, parity[shape.name] = run_shape(shape, args, device, dtype)
        rows += shape_rows
        _print_table(shape_rows)
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(device),
        "torch": torch.__version__,
        "transformers": peers.hf_version(),
        "hf_expert_implementations": peers.hf_implementations() if peers.hf_version() else [],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": openmp.current(),
        "malloc_retains_freed": retained,
        "quick": bool(args.quick),
        "rounds": args.rounds,
        "parity": parity,
        "rows": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-core {platform.machine()} {platform.processor() or ''}".strip()


def _print_table(rows: list[dict]) -> None:
    print(f"{'shape':<7} {'impl':<16} {'ms':>9} {'vs dense':>9} {'cpu ms':>9}  note")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['shape']:<7} {r['impl']:<16} {'-':>9} {'-':>9} {'-':>9}  {r['skipped']}")
            continue
        print(f"{r['shape']:<7} {r['impl']:<16} {r['ms']:>9.1f} {r['ratio_to_dense']:>9.2f} "
              f"{r['cpu_ms']:>9.1f}  {r.get('path', '')}")  # fmt: skip
    print()

"""`moesaic bench sample`: images/s and caption tokens/s on CPU; KV-cached vs uncached decoding.

The model is a freshly initialised one of the given preset (throughput does not depend on the
weights; an untrained model rarely emits eos, so every caption runs to the token limit), or
the latest checkpoint of `--run RUN_DIR`. Prompts and images are world `val` examples
(terse captions).
References, measured in the same process:

- images: the bare model forward passes the sampler makes (the same packed batch, `steps`
  times) — the ratio is the sampler's efficiency (1 = no overhead beyond the model);
- captions: decoding without the KV cache (a full re-forward per token) — the ratio is the
  cache's speed-up, which grows with the number of generated tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from moesaic.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="tiny", help="preset name or YAML path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.dim=256")
    p.add_argument("--run", type=Path, default=None, help="use this run's checkpoint instead")
    p.add_argument("--images", type=int, default=16, help="prompts per image measurement")
    p.add_argument("--steps", type=int, default=25, help="Euler steps per image")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale (two branches)")
    p.add_argument("--captions", type=int, default=16, help="images per caption measurement")
    p.add_argument("--tokens", type=int, nargs="+", default=[32, 128], help="max new tokens")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")


def _best(fn, repeats: int) -> tuple[float, object]:
    """(seconds of the fastest of `repeats` calls after one warm-up, last result)."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _model(args):
    from moesaic.data import load_tokenizer
    from moesaic.files import cache_dir
    from moesaic.model import Transformer
    from moesaic.runconfig import resolve_model_dims

    if args.run is not None:
        from moesaic.train.runs import load_run

        run = load_run(args.run, "cpu")
        return run.model, run.tokenizer, run.cfg, f"run {args.run} (step {run.step})"
    cfg = load_config(args.config, args.overrides)
    tok = load_tokenizer(cfg.data, cache_dir())
    cfg = resolve_model_dims(cfg, tok.vocab_size)
    torch.manual_seed(0)
    return Transformer(cfg.model).eval(), tok, cfg, f"preset {args.config} (untrained)"


def run(args: argparse.Namespace) -> int:
    from moesaic.evaluate.sampling import ImageSampling, Sampler, TextSampling
    from moesaic.evaluate.tasks import held_out

    torch.set_num_threads(args.threads)
    model, tok, cfg, what = _model(args)
    data = cfg.data
    sampler = Sampler(model, tok, data)
    world = ("val", "terse", data.image_size)
    prompts = [r.text for r in held_out("caption_image", args.images, 0, *world)]
    images = np.stack([r.images[0] for r in held_out("image_caption", args.captions, 0, *world)])

    opts = ImageSampling(steps=args.steps, cfg_scale=args.cfg)
    t_img, _ = _best(lambda: sampler.images(prompts, opts), args.repeats)
    docs = [sampler._image_doc(tok.encode(p), data.patches_per_image) for p in prompts]
    docs += [sampler._image_doc([], data.patches_per_image)] * len(prompts)  # guided: 2 branches
    batch = sampler._pack(docs)

    @torch.no_grad()
    def bare():
        for _ in range(args.steps):
            model(batch)

    t_ref, _ = _best(bare, args.repeats)
    rows = [
        ("images", f"{args.steps} steps, cfg {args.cfg}, batch {len(prompts)}",
         len(prompts) / t_img, "images/s", t_ref / t_img, "bare forward passes"),
    ]  # fmt: skip
    decoding = {}
    for n_tok in args.tokens:
        rates = {}
        for cached in (True, False):
            o = TextSampling(max_new_tokens=n_tok, use_cache=cached)
            t, ids = _best(lambda o=o: sampler.caption_ids(images, o), args.repeats)
            rates[cached] = sum(len(x) for x in ids) / t
        decoding[n_tok] = {
            "cached_tokens_per_s": rates[True],
            "uncached_tokens_per_s": rates[False],
            "cached_over_uncached": rates[True] / rates[False],
        }
        rows.append(("captions, cached", f"≤{n_tok} tokens, batch {len(images)}", rates[True],
                     "tokens/s", rates[True] / rates[False], "uncached decoding"))  # fmt: skip
        rows.append(("captions, uncached", f"≤{n_tok} tokens, batch {len(images)}", rates[False],
                     "tokens/s", 1.0, "itself"))  # fmt: skip

    print(f"sampling on CPU, {args.threads} thread(s): {what}, world val prompts/images, "
          f"{model.num_params(active=True):,} active parameters")  # fmt: skip
    print(f"{'what':<20} {'setting':<34} {'rate':>12} {'unit':<9} {'ratio':>7}  reference")
    for name, setting, rate, unit, ratio, ref in rows:
        print(f"{name:<20} {setting:<34} {rate:>12,.2f} {unit:<9} {ratio:>7.2f}  {ref}")
    result = {
        "model": what,
        "threads": args.threads,
        "images_per_s": len(prompts) / t_img,
        "image_steps": args.steps,
        "cfg": args.cfg,
        "image_efficiency_vs_bare_forward": t_ref / t_img,
        "decoding": {str(k): v for k, v in decoding.items()},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0

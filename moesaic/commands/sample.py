"""`moesaic sample RUN_DIR`: an image from a prompt, a caption of an image, or an answer.

    moesaic sample RUN_DIR --prompt "a large red circle top left" --out image.png
    moesaic sample RUN_DIR --image file.png                        # caption it
    moesaic sample RUN_DIR --image file.png --question "What colour is the circle?"
    moesaic sample RUN_DIR --image start.png --action "move the red circle left" --action ...
                                            # world model: frames after each action (PNG + GIF)

Generated images are written in the format `--out`'s suffix names (`OUT_FORMATS`: .png, .jpg /
.jpeg, .webp, .bmp, .gif, .tif / .tiff; anything else is refused), upscaled `--scale` times with
nearest-neighbour so the pixels stay sharp for viewing. Input images are decoded by the data
layer's one rule for real images (`moesaic.data.images`: known formats, a pixel cap, EXIF
orientation, every mode and bit depth, centre crop, area-average to `data.image_size`); a square
image whose side is a multiple of `data.image_size` (such as an upscaled sample) is first
reduced with nearest-neighbour, which inverts that upscaling exactly. A run whose data never
held images gets a one-line warning on stderr: its images and captions are not meaningful.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moesaic.errors import ConfigError, DataError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory (runs/NAME)")
    what = p.add_argument_group("what to generate")
    what.add_argument("--prompt", help="text → image: the caption to draw")
    what.add_argument("--image", help="image → text: an image file to caption (or to ask about)")
    what.add_argument("--question", help="with --image: a question to answer about it")
    what.add_argument(
        "--action", action="append", help="with --image: roll the world model forward under "
        "this action (repeat for more steps); writes --out as a strip and a GIF beside it",
    )  # fmt: skip
    p.add_argument(
        "--out",
        default="sample.png",
        help="image written for --prompt or, as a strip, for --action (.png, .jpg, .webp, ...)",
    )
    p.add_argument("--scale", type=int, default=16, help="nearest-neighbour upscale of --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25, help="Euler steps of the flow")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--sampler", default="euler", choices=("euler", "stochastic"))
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on generated tokens")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")


def read_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """An image file as [size, size, channels] float32 in [-1, 1] (module doc: resizing)."""
    from moesaic.data.images import ImageError, decode_image

    if not path.is_file():
        raise DataError(f"--image '{path}' does not exist or is not a file; give an image file")
    try:
        return decode_image(path, size, channels, nearest_multiple=True)
    except ImageError as e:
        fix = "downscale it first" if e.reason == "too_large" else "give a PNG, JPEG or WebP file"
        raise DataError(f"--image '{path}' {e}; {fix}") from None


OUT_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".gif": "GIF",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def out_format(path: Path) -> str:
    """The Pillow format `path`'s suffix names; `ConfigError` for a directory or another suffix."""
    from PIL import features

    if path.is_dir():
        raise ConfigError(f"--out '{path}' is a directory; give a file name such as {path}/x.png")
    fmt = OUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        names = ", ".join(OUT_FORMATS)
        raise ConfigError(f"--out '{path}' has no image suffix Pillow writes here ({names})")
    if fmt == "WEBP" and not features.check("webp"):
        raise ConfigError(f"--out '{path}': this Pillow has no WebP support; use .png")
    return fmt


def write_image(image_HWC: np.ndarray, path: Path, scale: int) -> None:
    """[S, S, C] in [-1, 1] (C = 3 or 1) → an image file in the format of `path`'s suffix,
    upscaled `scale`× with nearest-neighbour; written whole or not at all."""
    import io

    from PIL import Image

    from moesaic.files import atomic_write_bytes

    fmt = out_format(path)
    pixels = np.clip(np.round((image_HWC + 1.0) * 127.5), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise ConfigError(f"--out '{path}' cannot be written ({e.strerror or e})") from None


def _check(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.image is None):
        raise ConfigError(
            "give exactly one of --prompt TEXT (draw it) or --image FILE (caption it)"
        )
    if args.question is not None and args.image is None:
        raise ConfigError("--question needs --image FILE to ask about")
    if args.action and (args.image is None or args.question is not None):
        raise ConfigError("--action needs --image FILE (the start frame) and no --question")
    if args.scale < 1:
        raise ConfigError(f"--scale={args.scale} must be >= 1")
    if args.image is not None and not Path(args.image).is_file():
        raise DataError(
            f"--image '{args.image}' does not exist or is not a file; give an image file"
        )
    if args.prompt is not None:
        out_format(Path(args.out))
    if args.action and out_format(Path(args.out)) == "GIF":
        raise ConfigError(
            f"--out '{args.out}' with --action names the strip; the GIF is written beside it "
            "with suffix .gif, so give another suffix such as .png"
        )


def run(args: argparse.Namespace) -> int:
    from moesaic.data.sources import saw_images
    from moesaic.evaluate.sampling import ImageSampling, Sampler, TextSampling
    from moesaic.train.runs import load_run
    from moesaic.train.runtime import set_threads

    _check(args)
    loaded = load_run(Path(args.run_dir), args.device)
    set_threads(loaded.cfg.train)
    sampler = Sampler.from_run(loaded)
    if not args.action and not saw_images(loaded.cfg.data):
        data = loaded.cfg.data
        print(
            f"warning: run '{args.run_dir}' never saw images (data.source='{data.source}', "
            f"data.mix={data.mix}); its images and captions are not meaningful",
            file=sys.stderr,
        )
    if args.prompt is not None:
        opts = ImageSampling(args.steps, args.cfg, seed=args.seed, sampler=args.sampler)
        image = sampler.images([args.prompt], opts)[0]
        out = Path(args.out)
        write_image(image, out, args.scale)
        print(f"wrote {out} ({image.shape[0]}px × {args.scale})")
        return 0
    data = loaded.cfg.data
    image = read_image(Path(args.image), data.image_size, data.channels)
    if args.action:
        from moesaic.evaluate.world_model import rollout_to_files

        opts = ImageSampling(args.steps, None, seed=args.seed, sampler=args.sampler)
        rollout_to_files(sampler, image, args.action, Path(args.out), args.scale, opts)
        return 0
    text_opts = TextSampling(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.question is not None:
        print(sampler.answers(image[None], [args.question], text_opts)[0])
    else:
        print(sampler.captions(image[None], text_opts)[0])
    return 0

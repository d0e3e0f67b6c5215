"""A small real-data example written to disk (`moesaic data example DIR`): nothing downloaded.

    DIR/corpus/notes.txt             a text corpus: field notes of a river valley, one
                                     document per paragraph (blank lines between)
    DIR/photos/                      an image–caption folder: 64×48 PNG pictures of shapes on
                                     coloured grounds and captions.jsonl
    DIR/shards/photos-000.tar …      the same pictures as WebDataset shards
    DIR/ood.txt                      out-of-distribution text: station announcements
    DIR/train.yaml                   the tiny preset on corpus + photos, eval.ood_text = ood.txt
    DIR/train-shards.yaml            the same with the pictures read from the shards
    DIR/study.yaml                   the modality-tax smoke study on train.yaml

Everything is generated from a fixed seed, so the files are the same on every machine. The
counts are large enough for every held-out split to hold at least `MIN_EVAL_RECORDS` records
(5% of 420 documents and of 420 pictures). The YAML files name DIR by its absolute path.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import tarfile
from pathlib import Path

import yaml

from moesaic.errors import ConfigError

DOCS = 420
PICTURES = 420
SHARDS = 4
OOD_DOCS = 60
SIZE = (64, 48)

_PLACES = ["the mill", "the weir", "the ford", "the upper meadow", "the alder wood", "the lock"]
_BIRDS = ["heron", "kingfisher", "dipper", "wagtail", "sand martin", "moorhen", "swift"]
_PLANTS = ["meadowsweet", "purple loosestrife", "water mint", "yellow flag", "reed mace"]
_WEATHER = ["after a night of rain", "on a still grey morning", "in low sun", "in a cold wind"]
_WATER = ["ran high and brown", "was low and clear", "had risen a hand's width", "lay flat"]
_COLOURS = {
    "red": (200, 40, 40), "orange": (230, 130, 30), "yellow": (230, 210, 40),
    "green": (40, 160, 70), "blue": (40, 80, 200), "purple": (130, 50, 170),
    "white": (240, 240, 240), "black": (20, 20, 20),
}  # fmt: skip
_SHAPES = ("disc", "square", "triangle", "bar", "ring")


def field_note(rng: random.Random) -> str:
    """One document of the corpus: a few sentences of notes from the valley."""
    place, other = rng.sample(_PLACES, 2)
    bird, plant, n = rng.choice(_BIRDS), rng.choice(_PLANTS), rng.randint(2, 30)
    body = [
        f"The river {rng.choice(_WATER)}.",
        f"Counted {n} {bird}s between {place} and {other}.",
        f"The {plant} is {rng.choice(['coming into flower', 'over', 'thick along the bank'])}.",
    ]
    if rng.random() < 0.5:
        body.append(f"A {rng.choice(_BIRDS)} called twice from the far bank and was gone.")
    rng.shuffle(body)
    return " ".join([f"Walked down to {place} {rng.choice(_WEATHER)}.", *body])


def announcement(rng: random.Random) -> str:
    """One out-of-distribution document: a station announcement."""
    platform, minutes = rng.randint(1, 9), rng.choice([5, 10, 15, 20, 40])
    town = rng.choice(["Ashby", "Brockton", "Caldmoor", "Dunwell", "Eastleigh", "Fenwick"])
    return (
        f"The {rng.randint(6, 22):02d}:{rng.choice(['05', '17', '32', '48'])} service to {town} "
        f"will depart from platform {platform}. This train is delayed by approximately "
        f"{minutes} minutes. Please mind the gap between the train and the platform edge."
    )


def picture(rng: random.Random) -> tuple[bytes, str]:
    """A PNG of a shape on a coloured ground, and its caption."""
    from PIL import Image, ImageDraw

    ground, colour = rng.sample(sorted(_COLOURS), 2)
    shape = rng.choice(_SHAPES)
    size = rng.choice(["small", "large"])
    img = Image.new("RGB", SIZE, _COLOURS[ground])
    draw = ImageDraw.Draw(img)
    r = 8 if size == "small" else 18
    cx, cy = SIZE[0] // 2 + rng.randint(-6, 6), SIZE[1] // 2 + rng.randint(-4, 4)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = _COLOURS[colour]
    if shape == "disc":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "bar":
        draw.rectangle((cx - r, cy - r // 3, cx + r, cy + r // 3), fill=fill)
    else:
        draw.ellipse(box, outline=fill, width=max(2, r // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"a {size} {colour} {shape} on a {ground} ground"


def write_example(root: Path) -> dict[str, Path]:
    """Write the example into `root` (new or empty); returns the paths written, by name."""
    root = Path(root).absolute()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"'{root}' exists and is not an empty directory; give a new one")
    rng = random.Random(20261201)
    (root / "corpus").mkdir(parents=True)
    notes = root / "corpus" / "notes.txt"
    notes.write_text("\n\n".join(field_note(rng) for _ in range(DOCS)) + "\n")
    ood = root / "ood.txt"
    ood.write_text("\n\n".join(announcement(rng) for _ in range(OOD_DOCS)) + "\n")
    photos, shards = root / "photos", root / "shards"
    photos.mkdir()
    shards.mkdir()
    lines = []
    with contextlib.ExitStack() as stack:
        tars = [
            stack.enter_context(tarfile.open(shards / f"photos-{i:03d}.tar", "w"))
            for i in range(SHARDS)
        ]
        for i in range(PICTURES):
            png, caption = picture(rng)
            (photos / f"{i:04d}.png").write_bytes(png)
            lines.append(json.dumps({"file": f"{i:04d}.png", "caption": caption}))
            for name, blob in ((f"{i:04d}.png", png), (f"{i:04d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tars[i % SHARDS].addfile(info, io.BytesIO(blob))
    (photos / "captions.jsonl").write_text("\n".join(lines) + "\n")
    pattern = str(shards / f"photos-{{000..{SHARDS - 1:03d}}}.tar")
    corpus = {"kind": "text", "name": "notes", "paths": [str(notes)]}
    folder = {"kind": "folder", "name": "photos", "paths": [str(photos)]}
    tarred = {"kind": "webdataset", "name": "photos", "paths": [pattern]}
    out = {"corpus": notes, "photos": photos, "shards": shards, "ood": ood}
    for name, image_source in (("train", folder), ("train-shards", tarred)):
        path = root / f"{name}.yaml"
        data = {"sources": [corpus, image_source], "vocab_size": 1024}
        config = {"base": "tiny", "name": f"example-{name}", "data": data,
                  "eval": {"ood_text": [str(ood)]}}  # fmt: skip
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        out[name] = path
    study = {"preset": "smoke", "name": "compete-example", "base": str(out["train"])}
    out["study"] = root / "study.yaml"
    out["study"].write_text(yaml.safe_dump(study, sort_keys=False))
    return out

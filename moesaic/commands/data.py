"""`moesaic data example DIR`: write a small real-data example (a text corpus, an image–caption
folder, the same pictures as WebDataset shards, an out-of-distribution text file, and training
and study configs that use them; `moesaic.data.example`). Nothing is downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = sub.add_parser("example", help="write a small text corpus and image–caption set to DIR")
    ex.add_argument("dir", type=Path, help="a new or empty directory")


def run(args: argparse.Namespace) -> int:
    from moesaic.data.example import write_example

    paths = write_example(args.dir)
    for name, path in paths.items():
        print(f"{name:14s} {path}")
    train, study = paths["train"], paths["study"]
    print(f"next: moesaic train {train} out=runs   or   moesaic compete {study} --out runs")
    return 0

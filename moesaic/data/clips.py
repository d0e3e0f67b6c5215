"""Real video for the packer (`data.source: clips`): a folder of clips stored as frame images.

    data.paths: [ROOT, ...]
    ROOT/
      clip-0001/                one clip per sub-folder of a root (a root with frame images
        00000.png 00001.png …   and no sub-folders is one clip itself)
        actions.txt             optional: one action per line, line j = the step from frame j
                                to frame j + 1 (so frames − 1 lines)
      clip-0002/
        f1.jpg f2.jpg … f10.jpg
        actions.jsonl           optional, instead: {"action": "..."} per line, same meaning

Frames are read in natural name order (`f2` before `f10`) with Pillow, by the same rule as
every other image (`sources.to_array`). Frames as image files need no video-decoding
dependency, give random access to any window of a long clip, and are what
`ffmpeg -i clip.mp4 clip/%05d.png` writes.

Kinds: `video` from every clip of two or more frames; `action_video` from the clips whose
action file gives one action per step. A document is a window of T consecutive frames (and
their T − 1 actions), T uniform in [`data.video.min_frames`, `max_frames`] (the whole clip
when it is shorter), starting at a uniformly drawn frame — both drawn from the document's own
rng, so a long clip yields many documents and the stream stays a pure function of its seed.

Bad input is skipped and counted by reason (`skipped`), or raises with `data.strict`: a clip
with fewer than two frames (`short_clip`); an action file with the wrong number of lines or
an unreadable line (`bad_actions`, `malformed_line`, `bad_encoding`: the clip still serves
`video`); a frame Pillow cannot read (`bad_image`, `missing_file`: that document is skipped).
Splits hash the clip folder (`sources.RecordSource`); the tokenizer trains on the actions.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.sources import IMAGE_EXTS, RecordSource, _read_lines
from moesaic.data.world.generators import Record

CLIP_KINDS = ("video", "action_video")


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: f2 < f10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ClipSource(RecordSource):
    """Clip folders (module doc). A reference is (clip folder, frame paths, actions | None)."""

    kinds: tuple[str, ...] = CLIP_KINDS

    def __init__(self, cfg: DataConfig, split: str):
        super().__init__(cfg, split)
        self.with_actions = [ref for ref in self.items if ref[2] is not None]
        self.kinds = CLIP_KINDS if self.with_actions else ("video",)
        self._orders: dict[tuple[str, int], np.ndarray] = {}

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        items = []
        for root in paths:
            if not root.is_dir():
                self.bad("missing_file", str(root))
                continue
            subdirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
            for clip in subdirs or [root]:
                frames = sorted(
                    (f for f in clip.iterdir() if f.suffix.lower() in IMAGE_EXTS),
                    key=lambda f: natural_key(f.name),
                )
                if len(frames) < 2:
                    self.bad("short_clip", f"{clip} ({len(frames)} frames)")
                    continue
                items.append((str(clip), (clip, tuple(frames), self._actions(clip, len(frames)))))
        return items

    def _actions(self, clip: Path, n_frames: int) -> tuple[str, ...] | None:
        """The clip's actions, or None when it has no (usable) action file."""
        if (clip / "actions.jsonl").is_file():
            path = clip / "actions.jsonl"
            actions = []
            for n, line in _read_lines(path, self):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj.get("action", obj.get("text"))
                    if not isinstance(text, str) or not text.strip():
                        raise TypeError
                except (json.JSONDecodeError, TypeError, AttributeError):
                    self.bad("malformed_line", f"{path}:{n}")
                    return None
                actions.append(text.strip())
        elif (clip / "actions.txt").is_file():
            path = clip / "actions.txt"
            lines = _read_lines(path, self)
            if len(lines) != len(path.read_bytes().splitlines()):
                return None  # an undecodable line was counted by _read_lines
            actions = [text.strip() for _, text in lines if text.strip()]
        else:
            return None
        if len(actions) != n_frames - 1:
            self.bad("bad_actions", f"{path} ({len(actions)} actions for {n_frames} frames)")
            return None
        return tuple(actions)

    def text_of(self, ref: object) -> str:
        actions = ref[2]  # type: ignore[index]
        return " ".join(actions) if actions else ""

    def _order(self, kind: str, epoch: int, n: int) -> np.ndarray:
        key = (kind, epoch)
        if key not in self._orders:
            rng = np.random.default_rng([self.cfg.seed, epoch, CLIP_KINDS.index(kind), 11])
            self._orders = {key: rng.permutation(n)}
        return self._orders[key]

    def record(self, kind: str, index: int, rng: random.Random) -> Record | None:
        pool = self.with_actions if kind == "action_video" else self.items
        epoch, i = divmod(index, len(pool))
        clip, frames, actions = pool[int(self._order(kind, epoch, len(pool))[i])]
        video = self.cfg.video
        T = min(rng.randint(video.min_frames, video.max_frames), len(frames))
        start = rng.randrange(len(frames) - T + 1)
        images = []
        for path in frames[start : start + T]:
            img = self._image(path, str(path))
            if img is None:
                return None
            images.append(img)
        steps = tuple(actions[start : start + T - 1]) if actions else ()
        return Record(text=" ".join(steps), images=tuple(images), actions=steps)

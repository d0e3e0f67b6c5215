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

Frames are read in natural name order (`f2` before `f10`) and decoded by the one rule for real
images (`moesaic.data.images`, through the decode cache when on). Frames as image files need no
video-decoding dependency, give random access to any window of a long clip, and are what
`ffmpeg -i clip.mp4 clip/%05d.png` writes.

Kinds: `video` from every clip of two or more frames; `action_video` from the clips whose
action file gives one action per step. A document is a window of T consecutive frames (and
their T − 1 actions), T uniform in [`data.video.min_frames`, `max_frames`] (the whole clip
when it is shorter), starting at a uniformly drawn frame — both drawn from the document's own
rng, so a long clip yields many documents and the stream stays a pure function of its seed.

Bad input is skipped and counted by reason (`skipped`), or raises with `data.strict`: a clip
with fewer than two frames (`short_clip`); a clip holding a frame symlink that leaves its root
(`outside_root`, unless `data.follow_symlinks`); an action file with the wrong number of lines
or an unreadable line (`bad_actions`, `malformed_line`, `bad_encoding`, `too_long`: the clip
still serves `video`); a frame that does not decode (`bad_image`, `too_large`,
`missing_file`: each window holding it is skipped, the frame counted once and remembered in
the stream state). Splits hash the clip folder (`record_source`); the tokenizer trains on the
actions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from moesaic.config import DataConfig
from moesaic.data.reading import BadEncoding, Line, checked_text
from moesaic.data.record_source import (
    JSON_ERRORS,
    MAX_LINE_CHARS,
    RecordSource,
    Skip,
    json_field,
)
from moesaic.data.shards import IMAGE_EXTS
from moesaic.data.world.generators import Record
from moesaic.errors import DataError

CLIP_KINDS = ("video", "action_video")


def natural_key(name: str) -> list:
    """Sort key that orders embedded numbers numerically: f2 < f10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


class ClipSource(RecordSource):
    """Clip folders (module doc). A reference is (clip folder, frame paths, actions | None)."""

    kinds: tuple[str, ...] = CLIP_KINDS

    def __init__(self, cfg: DataConfig, split: str, label: str = ""):
        super().__init__(cfg, split, label)
        self.with_actions = [ref for ref in self.items if ref[2] is not None]
        self.kinds = CLIP_KINDS if self.with_actions else ("video",)
        self._orders: dict[tuple[str, int], np.ndarray] = {}
        self.bad_frames: dict[str, str] = {}  # frame path -> reason (counted once)

    def scan(self, paths: list[Path]) -> list[tuple[str, object]]:
        items = []
        for root in paths:
            if not root.is_dir():
                self.bad("missing_file", str(root))
                continue
            resolved = root.resolve()
            subdirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
            for clip in subdirs or [root]:
                frames = sorted(
                    (f for f in clip.iterdir() if f.suffix.lower() in IMAGE_EXTS),
                    key=lambda f: natural_key(f.name),
                )
                if len(frames) < 2:
                    self.bad("short_clip", f"{clip} ({len(frames)} frames)")
                    continue
                outside = [f for f in frames if not self._inside(f, resolved)]
                if outside:
                    self.bad("outside_root", f"{outside[0]} (a symlink out of '{root}')")
                    continue
                items.append((str(clip), (clip, tuple(frames), self._actions(clip, len(frames)))))
        return items

    def _inside(self, frame: Path, root: Path) -> bool:
        if self.cfg.follow_symlinks:
            return True
        try:
            return frame.resolve().is_relative_to(root)
        except (OSError, RuntimeError):
            return False

    def _actions(self, clip: Path, n_frames: int) -> tuple[str, ...] | None:
        """The clip's actions, or None when it has no (usable) action file."""
        if (clip / "actions.jsonl").is_file():
            path, parse = clip / "actions.jsonl", self._jsonl_actions
        elif (clip / "actions.txt").is_file():
            path, parse = clip / "actions.txt", self._txt_actions
        else:
            return None
        parsed = self._read(path, MAX_LINE_CHARS, parse)
        if not parsed:
            return None  # the problem that made it unusable was counted by _read
        actions = parsed[0]
        if len(actions) != n_frames - 1:
            self.bad("bad_actions", f"{path} ({len(actions)} actions for {n_frames} frames)")
            return None
        return actions

    def _txt_actions(self, path: Path, lines: Iterable[Line], problems: list) -> list:
        """[actions] (one non-empty line each), or [] when a line is unreadable."""
        actions = []
        for line in lines:
            text = self._line_text(path, line, problems)
            if text:
                actions.append(text)
        return [] if problems else [tuple(actions)]

    def _jsonl_actions(self, path: Path, lines: Iterable[Line], problems: list) -> list:
        """[actions] ({"action": ...} or {"text": ...} per line), or [] when one is bad."""
        actions = []
        for line in lines:
            text = self._line_text(path, line, problems)
            if not text:
                continue
            try:
                action = self._cap(json_field(text, "action", "text"))
            except BadEncoding as e:
                problems.append(("bad_encoding", f"{path}:{line.number} ({e})"))
                continue
            except JSON_ERRORS:
                problems.append(("malformed_line", f"{path}:{line.number}"))
                continue
            if not action:
                problems.append(("malformed_line", f"{path}:{line.number} (empty action)"))
                continue
            actions.append(action)
        return [] if problems else [tuple(actions)]

    def _line_text(self, path: Path, line: Line, problems: list) -> str:
        """A line's stripped text; "" (with the problem noted) when it cannot be used."""
        where = f"{path}:{line.number}"
        if line.text is None:
            problems.append(("bad_encoding", where))
        elif line.length > MAX_LINE_CHARS:
            problems.append(("too_long", where))
        else:
            try:
                return self._cap(checked_text(line.text))
            except BadEncoding as e:
                problems.append(("bad_encoding", f"{where} ({e})"))
        return ""

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
        """A window of the clip drawn at global `index`; None (counted) if a frame is bad."""
        pool = self.with_actions if kind == "action_video" else self.items
        epoch, i = divmod(index, len(pool))
        clip, frames, actions = pool[int(self._order(kind, epoch, len(pool))[i])]
        video = self.cfg.video
        T = min(rng.randint(video.min_frames, video.max_frames), len(frames))
        start = rng.randrange(len(frames) - T + 1)
        images = []
        for path in frames[start : start + T]:
            reason = self.bad_frames.get(str(path))
            if reason is None:
                try:
                    images.append(self._image(path, str(path)))
                    continue
                except Skip as s:
                    self.bad(s.reason, s.where)
                    self.bad_frames[str(path)] = reason = s.reason
            self.skipped_draws[reason] += 1
            if all(any(str(f) in self.bad_frames for f in ref[1]) for ref in pool):
                raise DataError(
                    f"every one of the {len(pool)} '{self.split}' clips of {self.label} holds "
                    f"an unreadable frame ({dict(self.skipped)}); fix the data"
                )
            return None
        steps = tuple(actions[start : start + T - 1]) if actions else ()
        return Record(text=" ".join(steps), images=tuple(images), actions=steps)

    def state_dict(self) -> dict:
        return super().state_dict() | {"bad_frames": dict(sorted(self.bad_frames.items()))}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bad_frames = {str(p): str(r) for p, r in state.get("bad_frames", {}).items()}

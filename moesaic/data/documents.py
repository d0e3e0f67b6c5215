"""Documents: the unit the packer places into rows, and how each kind is laid out.

Layouts (one document never straddles rows; `bos`/`eos` open and close every document):

    text           bos  text…                     eos
    caption_image  bos  caption…  boi [image] eoi eos      generation: image noised, flow loss
    image_caption  bos  boi [image] eoi  caption… eos      understanding: image clean
    vqa            bos  boi [image] eoi  question… answer… eos   (doc_kind IMAGE_CAPTION)
    image          bos  boi [image] eoi  eos              image-only: flow loss, no text loss
    caption        bos  caption…                  eos      a caption as plain text, no image
    video          bos  boi [f1] eoi  boi [f2] eoi … boi [fk] eoi  eos
    action_video   bos  boi [f1] eoi  action1…  boi [f2] eoi  action2… … boi [fk] eoi  eos

Video frames are image blocks of modality VIDEO, each with its own `image_id` and flow time.
Which frames are noised and carry flow loss depends on `data.video.context` (docs/video.md):
`clean` — frames 1..k−1 clean context, frame k (the last of the document; k drawn uniformly
from 2..T, the rest of the clip is left out) noised; `noised` — all T frames, each with its
own flow time, all with loss (diffusion forcing). A clip that does not fit `seq_len` loses
frames from its end.

Text targets: position i predicts the token at i+1 when that token is a text token flagged as
a target; otherwise its target is -1. Image positions never carry text targets, and neither
does the text position just before an image (its successor is a patch). So `boi` *is*
predicted (from the token before it) wherever the document carries text loss, while `eoi`
never is (it follows the last patch; its arrival is implied by the image size). Which tokens
are targets, per kind:

    text           every token after bos (text and eos)
    caption_image  caption, boi and eos, when `caption_loss` (default); none otherwise
    image_caption  boi, caption and eos
    vqa            boi, answer and eos (the question is context only)
    image          none
    caption        every token after bos (caption and eos), as in text (doc_kind TEXT)
    video          none
    action_video   none: actions are conditioning (the next action is not predictable from
                   the frames before it, so its text loss would be noise)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesaic.batch import DocKind, Modality

# Mix keys (config `data.mix`) and the DocKind each one is recorded as.
KIND_OF = {
    "text": DocKind.TEXT,
    "caption_image": DocKind.CAPTION_IMAGE,
    "image_caption": DocKind.IMAGE_CAPTION,
    "vqa": DocKind.IMAGE_CAPTION,
    "image": DocKind.IMAGE,
    "ood_text": DocKind.TEXT,  # eval only: laid out like text
    "caption": DocKind.TEXT,  # a caption alone, laid out like text
    "video": DocKind.VIDEO,
    "action_video": DocKind.ACTION_VIDEO,
}


@dataclasses.dataclass
class ImageBlock:
    """One image (or video frame) inside a document: `m` patches of `P` values."""

    start: int  # offset of the first patch inside the document
    patches: np.ndarray  # [m, P] float32 in [-1, 1]
    noise: np.ndarray  # [m, P] float32, ε of the flow
    t: float  # flow time (1 = clean, 0 = pure noise)
    loss: bool  # carries the flow-matching loss
    modality: int = int(Modality.IMAGE)  # Modality.VIDEO for video frames


@dataclasses.dataclass
class Doc:
    """A laid-out document of n positions, ready to copy into a row."""

    kind: str  # mix key
    tokens: np.ndarray  # [n] int64, pad id at image positions
    targets: np.ndarray  # [n] int64, -1 where there is no text target
    images: list[ImageBlock]
    key: tuple[str, int]  # provenance: (mix key, global document index)
    truncated: int = 0  # text tokens dropped because the document exceeded seq_len

    def __len__(self) -> int:
        return len(self.tokens)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    bos: int
    eos: int
    boi: int
    eoi: int


def assemble(
    kind: str,
    segments: list[tuple],
    ids: SpecialIds,
    key: tuple[str, int],
    max_len: int,
) -> Doc:
    """Lay out segments between bos and eos.

    segments: ("text", token_ids, is_target) or ("image", patches [m, P], noise [m, P], t,
    loss, boi_is_target) items; ("frame", …) items are laid out like images, as video frames
    (modality VIDEO). Text segments are truncated from their end if the document
    would exceed `max_len` (only text can be shortened; the caller guarantees images fit).
    eos is a target when the last text segment before it is (or, for image-ending documents,
    when the image's boi was).
    """
    n_fixed = 2 + sum(s[1].shape[0] + 2 for s in segments if s[0] != "text")
    n_text = sum(len(s[1]) for s in segments if s[0] == "text")
    budget = max_len - n_fixed
    truncated = max(0, n_text - budget)
    toks: list[int] = [ids.bos]
    flags: list[bool] = [False]
    images: list[ImageBlock] = []
    last_flag, remaining = False, budget
    for seg in segments:
        if seg[0] == "text":
            part = seg[1][: max(remaining, 0)]
            remaining -= len(part)
            toks += part
            flags += [seg[2]] * len(part)
            last_flag = seg[2]
        else:
            what, patches, noise, t, loss, boi_flag = seg
            m = patches.shape[0]
            modality = int(Modality.VIDEO if what == "frame" else Modality.IMAGE)
            start = len(toks) + 1
            images.append(ImageBlock(start, patches, noise, float(t), bool(loss), modality))
            toks += [ids.boi] + [ids.pad] * m + [ids.eoi]
            flags += [boi_flag] + [False] * (m + 1)
            last_flag = boi_flag
    toks.append(ids.eos)
    flags.append(last_flag)
    tokens = np.array(toks, dtype=np.int64)
    flag_arr = np.array(flags, dtype=bool)
    targets = np.full(len(tokens), -1, dtype=np.int64)
    targets[:-1] = np.where(flag_arr[1:], tokens[1:], -1)
    return Doc(kind, tokens, targets, images, key, truncated)


def flow_time(u: float, shift: float) -> float:
    """Flow time t from a uniform u ∈ [0, 1): noise level σ = 1 − t = s·u / (1 + (s − 1)·u).

    The SD3-style shift s > 1 moves samples toward noise (small t), s = 1 is uniform.
    """
    sigma = shift * u / (1.0 + (shift - 1.0) * u)
    return min(max(1.0 - sigma, 0.0), 1.0)


def eval_time_grid(n: int) -> list[float]:
    """The fixed flow-time grid of the image eval set: n midpoints (i + 0.5) / n of (0, 1)."""
    return [(i + 0.5) / n for i in range(n)]


def min_image_doc_len(patches_per_image: int) -> int:
    """Positions an image document needs without any text: bos boi [patches] eoi eos."""
    return patches_per_image + 4


def video_doc_len(frames: int, patches_per_image: int, text_tokens: int = 0) -> int:
    """Positions of a clip document of `frames` frames and `text_tokens` action tokens."""
    return 2 + frames * (patches_per_image + 2) + text_tokens

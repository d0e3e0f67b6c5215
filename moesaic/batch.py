"""The packed multimodal `Batch`: the one interface between data and model (design.md §2).

Every field is a tensor whose first two dimensions are [B, L] (rows × positions). Text
positions carry token ids; image positions and video-frame positions (together: *visual*
positions) carry flattened `p×p×C` patch vectors. Each image and each video frame is its own
block (`image_id`), with its own flow time. The flow
noising `x_t = t·x0 + (1−t)·ε` is done by the model from `patches` (x0), `noise` (ε) and `t`,
so a batch fully determines the loss: data streams that are exactly resumable give exactly
resumable training, and evaluation batches with fixed noise give deterministic eval losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import IntEnum

import torch
from torch import Tensor


class Modality(IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2  # patches of a video frame (actions are written as text, so they are TEXT)


class DocKind(IntEnum):
    """What kind of document a position belongs to (used for loss bookkeeping and routing stats)."""

    TEXT = 0  # plain text document
    CAPTION_IMAGE = 1  # caption then image: generation (image noised, carries flow loss)
    IMAGE_CAPTION = 2  # image then caption: understanding (image clean or lightly noised)
    IMAGE = 3  # image-only document
    PAD = 4  # padding at the end of a row
    VIDEO = 5  # a bare clip: frame blocks back to back
    ACTION_VIDEO = 6  # frame, action text, frame, action text, …: world modelling


NUM_DOC_KINDS = len(DocKind)


@dataclasses.dataclass
class Batch:
    """A packed batch. Shapes: B rows, L positions, P = patch_size² · channels.

    tokens:     [B, L] int64   text token ids (pad id at image positions)
    targets:    [B, L] int64   next-token target at each position, -1 where there is no text loss
    patches:    [B, L, P] f32  clean patches x0 in [-1, 1] at visual positions, 0 elsewhere
    noise:      [B, L, P] f32  flow noise ε at visual positions, 0 elsewhere
    t:          [B, L] f32     flow time of the position's block (1 clean, 0 pure noise); 1 at text
    image_loss: [B, L] bool    visual positions that carry flow-matching loss (images and frames)
    modality:   [B, L] int64   `Modality` id per position
    image_id:   [B, L] int64   image / frame block id (unique within a row), -1 at text positions
    doc_id:     [B, L] int64   document id within a row; padding forms its own document
    doc_kind:   [B, L] int64   `DocKind` per position
    """

    tokens: Tensor
    targets: Tensor
    patches: Tensor
    noise: Tensor
    t: Tensor
    image_loss: Tensor
    modality: Tensor
    image_id: Tensor
    doc_id: Tensor
    doc_kind: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    @property
    def patch_dim(self) -> int:
        return self.patches.shape[-1]

    @property
    def text_mask(self) -> Tensor:
        return self.modality == Modality.TEXT

    @property
    def image_mask(self) -> Tensor:
        return self.modality == Modality.IMAGE

    @property
    def video_mask(self) -> Tensor:
        return self.modality == Modality.VIDEO

    @property
    def visual_mask(self) -> Tensor:
        """Positions that hold patches: image and video-frame positions."""
        return (self.modality == Modality.IMAGE) | (self.modality == Modality.VIDEO)

    @property
    def num_text_targets(self) -> int:
        return int((self.targets >= 0).sum())

    @property
    def num_real_tokens(self) -> int:
        """Positions that are not padding."""
        return int((self.doc_kind != DocKind.PAD).sum())

    def map(self, fn: Callable[[Tensor], Tensor]) -> Batch:
        return Batch(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self.map(lambda x: x.to(device, non_blocking=non_blocking))

    def rows(self, start: int, stop: int) -> Batch:
        """Rows [start, stop): used to split a batch into micro-batches."""
        return self.map(lambda x: x[start:stop])

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        names = [f.name for f in dataclasses.fields(Batch)]
        return Batch(**{n: torch.cat([getattr(b, n) for b in batches]) for n in names})

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Check invariants; raises AssertionError naming the broken one (used by tests)."""
        B, L = self.shape
        for name, x in self.tensors().items():
            assert x.shape[:2] == (B, L), f"{name} has shape {tuple(x.shape)}, want [{B}, {L}, ...]"
        assert self.patches.shape == self.noise.shape, "patches and noise differ in shape"
        assert self.patches.dim() == 3, "patches must be [B, L, P]"
        for name in ("tokens", "targets", "modality", "image_id", "doc_id", "doc_kind"):
            assert getattr(self, name).dtype == torch.int64, f"{name} must be int64"
        assert self.image_loss.dtype == torch.bool, "image_loss must be bool"
        img = self.visual_mask
        assert bool(((self.image_id >= 0) == img).all()), (
            "image_id must be >= 0 exactly at image / frame positions"
        )
        assert not bool((self.image_loss & ~img).any()), "image_loss set at a text position"
        assert not bool((self.targets[img] >= 0).any()), "text target at an image position"
        assert bool((self.patches[~img] == 0).all()), "non-zero patch at a text position"
        assert bool((self.t >= 0).all() and (self.t <= 1).all()), "t outside [0, 1]"
        assert bool((self.patches.abs() <= 1.0 + 1e-6).all()), "patch values outside [-1, 1]"
        # An image block lies inside one document, is contiguous and has one modality.
        for b in range(B):
            ids = self.image_id[b]
            for i in ids.unique().tolist():
                if i < 0:
                    continue
                pos = (ids == i).nonzero().flatten()
                assert int(pos[-1] - pos[0]) + 1 == pos.numel(), (
                    f"image {i} in row {b} not contiguous"
                )
                assert self.doc_id[b, pos].unique().numel() == 1, f"image {i} spans documents"
                assert self.modality[b, pos].unique().numel() == 1, f"image {i} mixes modalities"

"""Sampling from a trained model: images from text, captions and answers from images.

Every sequence is laid out by the data layer (`documents.assemble` + `packing.pack_rows`),
exactly as the packer lays out the training document of that kind:

    text → image     bos caption… boi [x_t] eoi eos     caption_image; the unconditional
                                                        branch is the dropped-caption layout
    image → caption  bos boi [image] eoi ▸ caption…     image_caption, clean image (t = 1)
    VQA              bos boi [image] eoi question… ▸ answer…

(▸: where decoding starts; the prefix is the training document without its trailing eos.)

Images: Euler integration of the learned flow from t = 0 (noise) to t = 1, with
`x_t = t·x0 + (1−t)·ε`. The model sees the current x_t as the image block's patches (the
batch carries it as both `patches` and `noise`, so the model's own noising
`t·patches + (1−t)·noise` gives back x_t exactly) and the step's t at every patch; attention
inside the block is bidirectional (the model's mask, from image_id). The velocity is the image
head's output, or `(x̂0 − x_t)/(1 − t)` when the model predicts x0. Classifier-free guidance
mixes the two branches, `v = v_u + s·(v_c − v_u)` (s = 0: unconditional, s = 1: conditional).
The time grid is `t_i = flow_time(1 − i/steps, shift)`, the training schedule's shift toward
noise (`data.time_shift` by default; shift 1 = uniform steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from moesaic.batch import Batch
from moesaic.config import DataConfig
from moesaic.data.documents import Doc, assemble, flow_time
from moesaic.data.packing import pack_rows
from moesaic.data.world.scenes import patchify, unpatchify
from moesaic.errors import ConfigError
from moesaic.evaluate.decoding import TextSampling, decode, right_align

__all__ = ["ImageSampling", "Sampler", "TextSampling", "time_grid"]


@dataclasses.dataclass(frozen=True)
class ImageSampling:
    """How images are generated. cfg_scale None: the conditional branch alone (no guidance)."""

    steps: int = 25
    cfg_scale: float | None = 3.0
    shift: float | None = None  # None: the run's data.time_shift
    seed: int = 0
    batch_size: int = 64

    def check(self) -> ImageSampling:
        if self.steps < 1:
            raise ConfigError(f"--steps={self.steps} must be >= 1")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ConfigError(f"--cfg={self.cfg_scale} must be >= 0 (1 = no guidance)")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"shift={self.shift} must be > 0 (1 = uniform time steps)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        return self


def time_grid(steps: int, shift: float) -> list[float]:
    """steps + 1 flow times from 0 (noise) to 1 (clean), denser near noise when shift > 1."""
    return [flow_time(1.0 - i / steps, shift) for i in range(steps + 1)]


class Sampler:
    """Generation with one model and tokenizer, laid out for the run's data config."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        data: DataConfig,
        device: torch.device | str = "cpu",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model, self.tok, self.data = model, tokenizer, data
        self.device, self.autocast = torch.device(device), autocast
        self.ids = tokenizer.special
        self.prediction = getattr(getattr(model, "cfg", None), "prediction", "velocity")

    @classmethod
    def from_run(cls, run) -> Sampler:
        """From a `moesaic.train.runs.LoadedRun`."""
        return cls(run.model, run.tokenizer, run.cfg.data, run.device, run.autocast)

    # ------------------------------------------------------------------ layout

    def _pack(self, docs: list[Doc]) -> Batch:
        L = max(len(d) for d in docs)
        data = dataclasses.replace(self.data, seq_len=L)
        return pack_rows([[d] for d in docs], data, self.ids.pad).to(self.device)

    def _image_doc(self, caption_ids: list[int], m: int) -> Doc:
        """A caption → image document (image patches filled in per step)."""
        zeros = np.zeros((m, self.data.patch_dim), dtype=np.float32)
        segs = [("text", caption_ids, False), ("image", zeros, zeros, 0.0, True, False)]
        return assemble("caption_image", segs, self.ids, ("caption_image", 0), self.data.seq_len)

    def _prefix_doc(self, kind: str, image_HWC: np.ndarray, question: list[int] | None) -> Doc:
        """image → text document up to where the model is to continue (its eos removed)."""
        patches = patchify(np.asarray(image_HWC, dtype=np.float32), self.data.patch_size)
        segs: list[tuple] = [("image", patches, np.zeros_like(patches), 1.0, False, True)]
        if question is not None:
            segs.append(("text", question, False))
        doc = assemble(kind, segs, self.ids, (kind, 0), self.data.seq_len)
        return dataclasses.replace(doc, tokens=doc.tokens[:-1], targets=doc.targets[:-1])

    # ------------------------------------------------------------------ images

    def _velocity(self, batch: Batch, x_NmP: Tensor, t: float) -> Tensor:
        """Model velocity [N, m, P] at flow time t for the image block of every row."""
        img = batch.image_mask
        N, m, P = x_NmP.shape
        flat = x_NmP.reshape(N * m, P).to(batch.patches.dtype)
        batch.patches[img] = flat
        batch.noise[img] = flat
        batch.t[img] = t
        with self.autocast():
            pred = self.model(batch).image_pred
        pred = pred[img].float().view(N, m, P)
        if self.prediction == "x0":
            return (pred - x_NmP) / max(1.0 - t, 1e-4)
        return pred

    @torch.no_grad()
    def images(self, prompts: Sequence[str], opts: ImageSampling | None = None) -> np.ndarray:
        """Images for text prompts: [N, S, S, C] float32 in [-1, 1]. Deterministic given
        `opts.seed`; prompt i's starting noise does not depend on the batch size."""
        opts = (opts or ImageSampling()).check()
        data = self.data
        S, C, m, P = data.image_size, data.channels, data.patches_per_image, data.patch_dim
        if not prompts:
            return np.zeros((0, S, S, C), dtype=np.float32)
        gen = torch.Generator().manual_seed(opts.seed)
        noise = torch.randn(len(prompts), m, P, generator=gen)
        grid = time_grid(opts.steps, data.time_shift if opts.shift is None else opts.shift)
        guided = opts.cfg_scale is not None
        out = []
        for lo in range(0, len(prompts), opts.batch_size):
            chunk = list(prompts[lo : lo + opts.batch_size])
            docs = [self._image_doc(self.tok.encode(p), m) for p in chunk]
            if guided:
                docs += [self._image_doc([], m)] * len(chunk)  # the dropped-caption layout
            batch = self._pack(docs)
            x = noise[lo : lo + len(chunk)].to(self.device)
            for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
                if guided:
                    v_c, v_u = self._velocity(batch, torch.cat([x, x]), t0).chunk(2)
                    v = v_u + opts.cfg_scale * (v_c - v_u)
                else:
                    v = self._velocity(batch, x, t0)
                x = x + (t1 - t0) * v
            out.append(x.clamp(-1.0, 1.0).cpu())
        patches = torch.cat(out).numpy()
        return np.stack([unpatchify(p, S, data.patch_size) for p in patches]).astype(np.float32)

    # ------------------------------------------------------------------ text

    def _continue(self, docs: list[Doc], opts: TextSampling | None) -> list[list[int]]:
        """Generated token ids after each prefix document (eos excluded)."""
        opts = (opts or TextSampling()).check()
        out: list[list[int]] = []
        for lo in range(0, len(docs), opts.batch_size):
            chunk = docs[lo : lo + opts.batch_size]
            batch, positions = right_align(self._pack(chunk), [len(d) for d in chunk])
            room = self.data.seq_len - batch.shape[1]
            n_new = opts.max_new_tokens or max(room, 1)
            out += decode(
                self.model, batch, positions, opts, self.ids.eos, self.ids.pad, n_new,
                self.autocast,
            )  # fmt: skip
        return out

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        S, C = self.data.image_size, self.data.channels
        if x.ndim != 4 or x.shape[1:] != (S, S, C):
            raise ConfigError(
                f"images of shape {tuple(x.shape)} do not fit the run (want [N, {S}, {S}, {C}]); "
                "resize them to data.image_size"
            )
        return x

    def caption_ids(self, images: np.ndarray, opts: TextSampling | None = None) -> list[list[int]]:
        """Generated caption token ids for each image [N, S, S, C] in [-1, 1]."""
        x = self._check_images(images)
        return self._continue([self._prefix_doc("image_caption", im, None) for im in x], opts)

    def captions(self, images: np.ndarray, opts: TextSampling | None = None) -> list[str]:
        """A caption for each image [N, S, S, C] in [-1, 1]."""
        return [self.tok.decode(ids) for ids in self.caption_ids(images, opts)]

    def answers(
        self,
        images: np.ndarray,
        questions: Sequence[str],
        opts: TextSampling | None = None,
    ) -> list[str]:
        """A short answer to each (image, question) pair (leading/trailing space stripped)."""
        x = self._check_images(images)
        if len(x) != len(questions):
            raise ConfigError(f"{len(x)} images but {len(questions)} questions; give one each")
        qs = [self.tok.encode(q) for q in questions]
        docs = [self._prefix_doc("vqa", im, q) for im, q in zip(x, qs, strict=True)]
        return [self.tok.decode(ids).strip() for ids in self._continue(docs, opts)]

"""Sampling from a trained model: images from text, captions and answers from images, and
world-model rollouts (frames from a start frame and actions).

Every sequence is laid out by the data layer (`documents.assemble` + `packing.pack_rows`),
exactly as the packer lays out the training document of that kind:

    text → image     bos caption… boi [x_t] eoi eos     caption_image; the unconditional
                                                        branch is the dropped-caption layout
    image → caption  bos boi [image] eoi ▸ caption…     image_caption, clean image (t = 1)
    VQA              bos boi [image] eoi question… ▸ answer…
    rollout step k   bos boi [f0] eoi a1… boi [f1] eoi … ak… boi [x_t] eoi eos   action_video

(▸: where decoding starts; the prefix is the training document without its trailing eos.)

Rollouts: frame k is generated like an image, from the clean start frame, the frames generated
so far (clean, t = 1: the `clean` training layout) and the actions up to the k-th; it is then
appended to the context. The context keeps the last `data.video.max_frames − 1` frames (the
longest context seen in training) and fewer if the document would not fit `data.seq_len`. With
guidance the unconditional branch is the same frames without the actions (the `video` layout),
so it needs a run trained on bare `video` documents too; by default rollouts are unguided.

Images: Euler integration of the learned flow from t = 0 (noise) to t = 1, with
`x_t = t·x0 + (1−t)·ε`. The model sees the current x_t as the image block's patches (the
batch carries it as both `patches` and `noise`, so the model's own noising
`t·patches + (1−t)·noise` gives back x_t exactly) and the step's t at every patch; attention
inside the block is bidirectional (the model's mask, from image_id). The velocity is the image
head's output, or `(x̂0 − x_t)/(1 − t)` when the model predicts x0. Classifier-free guidance
mixes the two branches, `v = v_u + s·(v_c − v_u)` (s = 0: unconditional, s = 1: conditional).
The time grid is `t_i = flow_time(1 − i/steps, shift)`, the training schedule's shift toward
noise (`data.time_shift` by default; shift 1 = uniform steps). `sampler: stochastic` replaces
the Euler step by re-noising the model's clean estimate: `x̂0 = x_t + (1 − t_i)·v`, then
`x_{t_{i+1}} = t_{i+1}·x̂0 + (1 − t_{i+1})·ε_i` with fresh noise ε_i, so every input the
model sees has the noise statistics of training; errors of early steps are not carried along
the trajectory, which suits nearly deterministic targets such as the next frame of a world.
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
from moesaic.data.documents import Doc, assemble, flow_time, video_doc_len
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
    sampler: str = "euler"  # euler | stochastic (module doc)

    def check(self) -> ImageSampling:
        if self.steps < 1:
            raise ConfigError(f"--steps={self.steps} must be >= 1")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ConfigError(f"--cfg={self.cfg_scale} must be >= 0 (1 = no guidance)")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"shift={self.shift} must be > 0 (1 = uniform time steps)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1")
        if self.sampler not in ("euler", "stochastic"):
            raise ConfigError(f"--sampler={self.sampler} is not one of euler, stochastic")
        return self

    def step_noise(self, gen: torch.Generator, n: int, m: int, p: int) -> Tensor | None:
        """Fresh noise of the stochastic sampler for n rows, [n, steps, m, p] (None: Euler)."""
        if self.sampler != "stochastic":
            return None
        return torch.randn(n, self.steps, m, p, generator=gen)


def advance(x: Tensor, v: Tensor, t0: float, t1: float, fresh: Tensor | None) -> Tensor:
    """One sampling step from t0 to t1: Euler along v, or re-noise the clean estimate with
    `fresh` noise (module doc)."""
    if fresh is None:
        return x + (t1 - t0) * v
    return t1 * (x + (1.0 - t0) * v) + (1.0 - t1) * fresh.to(x.device, x.dtype)


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

    def _velocity(self, batch: Batch, x_NmP: Tensor, t: float, img: Tensor | None = None) -> Tensor:
        """Model velocity [N, m, P] at flow time t for the image block of every row (or the
        `m` positions per row that `img` [N, L] marks)."""
        img = batch.image_mask if img is None else img
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
        fresh = opts.step_noise(gen, len(prompts), m, P)
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
            for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
                if guided:
                    v_c, v_u = self._velocity(batch, torch.cat([x, x]), t0).chunk(2)
                    v = v_u + opts.cfg_scale * (v_c - v_u)
                else:
                    v = self._velocity(batch, x, t0)
                x = advance(x, v, t0, t1, None if fresh is None else fresh[lo : lo + len(chunk), i])
            out.append(x.clamp(-1.0, 1.0).cpu())
        patches = torch.cat(out).numpy()
        return np.stack([unpatchify(p, S, data.patch_size) for p in patches]).astype(np.float32)

    # ------------------------------------------------------------------ world-model rollouts

    def _world_doc(self, frames: list[np.ndarray], actions: list[list[int]], m: int) -> Doc:
        """A rollout document: context frames (clean) with the action after each (none for the
        unconditional branch), then the frame to generate; oldest frames dropped to fit."""
        keep = max(1, min(len(frames), self.data.video.max_frames - 1))
        while keep > 1:
            n_text = sum(map(len, actions[-keep:])) if actions else 0
            if video_doc_len(keep + 1, m, n_text) <= self.data.seq_len:
                break
            keep -= 1
        frames, actions = frames[-keep:], actions[-keep:] if actions else []
        segs: list[tuple] = []
        for j, f in enumerate(frames):
            segs.append(("frame", f, np.zeros_like(f), 1.0, False, False))
            if actions:
                segs.append(("text", actions[j], False))
        zeros = np.zeros_like(frames[0])
        segs.append(("frame", zeros, zeros, 0.0, True, False))
        kind = "action_video" if actions else "video"
        return assemble(kind, segs, self.ids, (kind, 0), 1 << 30)

    @torch.no_grad()
    def rollout(
        self,
        starts: np.ndarray,
        actions: Sequence[Sequence[str]],
        opts: ImageSampling | None = None,
    ) -> np.ndarray:
        """Frames after each action: starts [N, S, S, C] in [-1, 1], N lists of K action texts
        → [N, K, S, S, C]. `opts.cfg_scale` None (the default here) rolls out unguided.
        Deterministic given `opts.seed`; row i's noise does not depend on the batch size."""
        opts = (opts or ImageSampling(cfg_scale=None)).check()
        x0 = self._check_images(starts)
        if len(actions) != len(x0) or len({len(a) for a in actions}) > 1:
            raise ConfigError(
                f"{len(x0)} start frames need as many action lists, all of one length "
                f"(got {[len(a) for a in actions]})"
            )
        data = self.data
        S, C, m, P = data.image_size, data.channels, data.patches_per_image, data.patch_dim
        K = len(actions[0]) if len(actions) else 0
        if K == 0:
            return np.zeros((len(x0), 0, S, S, C), dtype=np.float32)
        gen = torch.Generator().manual_seed(opts.seed)
        noise = torch.randn(len(x0), K, m, P, generator=gen)
        grid = time_grid(opts.steps, data.time_shift if opts.shift is None else opts.shift)
        guided = opts.cfg_scale is not None
        frames = [[patchify(im, data.patch_size)] for im in x0]
        tokens = [[self.tok.encode(a) for a in row] for row in actions]
        for k in range(K):
            fresh = opts.step_noise(gen, len(x0), m, P)
            for lo in range(0, len(x0), opts.batch_size):
                rows = range(lo, min(lo + opts.batch_size, len(x0)))
                docs = [self._world_doc(frames[i], tokens[i][: k + 1], m) for i in rows]
                if guided:
                    docs += [self._world_doc(frames[i], [], m) for i in rows]
                batch = self._pack(docs)
                target = batch.image_loss
                x = noise[lo : lo + len(rows), k].to(self.device)
                for i, (t0, t1) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
                    if guided:
                        v_c, v_u = self._velocity(batch, torch.cat([x, x]), t0, target).chunk(2)
                        v = v_u + opts.cfg_scale * (v_c - v_u)
                    else:
                        v = self._velocity(batch, x, t0, target)
                    f = None if fresh is None else fresh[lo : lo + len(rows), i]
                    x = advance(x, v, t0, t1, f)
                out = x.clamp(-1.0, 1.0).cpu().numpy()
                for j, i in enumerate(rows):
                    frames[i].append(out[j])
        return (
            np.stack(
                [np.stack([unpatchify(f, S, data.patch_size) for f in row[1:]]) for row in frames]
            )
            .reshape(len(x0), K, S, S, C)
            .astype(np.float32)
        )

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

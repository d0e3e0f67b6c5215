"""Tiny model configs and hand-built random `Batch`es for model tests (no data pipeline)."""

from __future__ import annotations

import dataclasses

import torch

from moesaic.batch import Batch, DocKind, Modality
from moesaic.config import FFNConfig, ModelConfig

VOCAB, PATCH_DIM = 64, 12
PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4


def tiny_config(**ffn: object) -> ModelConfig:
    """dim 32, 2 layers, 2 heads, FFN width 64; `ffn` overrides FFNConfig fields."""
    model = {
        k: ffn.pop(k) for k in list(ffn) if k in {f.name for f in dataclasses.fields(ModelConfig)}
    }
    return ModelConfig(
        dim=32,
        layers=2,
        heads=2,
        vocab_size=VOCAB,
        patch_dim=PATCH_DIM,
        ffn=FFNConfig(hidden=64, **ffn),  # type: ignore[arg-type]
        **model,  # type: ignore[arg-type]
    )


def moe_config(**kw: object) -> ModelConfig:
    base = {"kind": "moe", "experts": 8, "granularity": 2}
    return tiny_config(**{**base, **kw})


class _Row:
    def __init__(self, L: int, P: int):
        self.L, self.P, self.n = L, P, 0
        self.tokens = [PAD] * L
        self.targets = [-1] * L
        self.modality = [int(Modality.TEXT)] * L
        self.image_id = [-1] * L
        self.doc_id = [0] * L
        self.doc_kind = [int(DocKind.PAD)] * L
        self.t = [1.0] * L
        self.image_loss = [False] * L
        self.patches = torch.zeros(L, P)
        self.noise = torch.zeros(L, P)
        self.docs = self.images = 0

    def room(self) -> int:
        return self.L - self.n

    def text(self, ids: list[int], kind: DocKind) -> None:
        for i, tok in enumerate(ids):
            p = self.n + i
            self.tokens[p] = tok
            self.doc_id[p], self.doc_kind[p] = self.docs, int(kind)
            if i + 1 < len(ids):
                self.targets[p] = ids[i + 1]
        self.n += len(ids)

    def image(self, n: int, kind: DocKind, t: float, loss: bool, g: torch.Generator) -> None:
        for p in range(self.n, self.n + n):
            self.tokens[p], self.modality[p] = PAD, int(Modality.IMAGE)
            self.image_id[p], self.doc_id[p], self.doc_kind[p] = self.images, self.docs, int(kind)
            self.t[p], self.image_loss[p] = t, loss
        self.patches[self.n : self.n + n] = torch.rand(n, self.P, generator=g) * 2 - 1
        self.noise[self.n : self.n + n] = torch.randn(n, self.P, generator=g)
        self.images += 1
        self.n += n

    def pad(self) -> None:
        for p in range(self.n, self.L):
            self.doc_id[p] = self.docs
        self.docs += 1


def random_batch(
    B: int = 2,
    L: int = 32,
    seed: int = 0,
    patches_per_image: int = 4,
    patch_dim: int = PATCH_DIM,
    vocab: int = VOCAB,
    kinds: tuple[DocKind, ...] = (DocKind.TEXT, DocKind.CAPTION_IMAGE, DocKind.IMAGE_CAPTION),
) -> Batch:
    """A valid packed batch: random documents of `kinds` until the row is full, then padding.

    Text docs are BOS w… EOS; caption→image docs are caption BOI image EOI (image noised with
    flow loss); image→caption docs are BOI image EOI caption (clean image, no flow loss).
    """
    g = torch.Generator().manual_seed(seed)
    rows = []

    def words(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    for _ in range(B):
        row = _Row(L, patch_dim)
        while True:
            kind = kinds[int(torch.randint(len(kinds), (1,), generator=g))]
            n_words = int(torch.randint(2, 6, (1,), generator=g))
            need = n_words + 2 + (patches_per_image + 2 if kind != DocKind.TEXT else 0)
            if need > row.room():
                break
            if kind == DocKind.TEXT:
                row.text([BOS, *words(n_words), EOS], kind)
            elif kind == DocKind.CAPTION_IMAGE:
                row.text([BOS, *words(n_words), BOI], kind)
                t = float(torch.rand((), generator=g))
                row.image(patches_per_image, kind, t, True, g)
                row.text([EOI, EOS], kind)
            elif kind == DocKind.IMAGE_CAPTION:
                row.text([BOS, BOI], kind)
                row.image(patches_per_image, kind, 1.0, False, g)
                row.text([EOI, *words(n_words), EOS], kind)
            else:
                row.text([BOS, BOI], kind)
                t = float(torch.rand((), generator=g))
                row.image(patches_per_image, kind, t, True, g)
                row.text([EOI, EOS], kind)
            row.docs += 1
        row.pad()
        rows.append(row)

    def stack(name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor([getattr(r, name) for r in rows], dtype=dtype)

    batch = Batch(
        tokens=stack("tokens", torch.int64),
        targets=stack("targets", torch.int64),
        patches=torch.stack([r.patches for r in rows]),
        noise=torch.stack([r.noise for r in rows]),
        t=stack("t", torch.float32),
        image_loss=stack("image_loss", torch.bool),
        modality=stack("modality", torch.int64),
        image_id=stack("image_id", torch.int64),
        doc_id=stack("doc_id", torch.int64),
        doc_kind=stack("doc_kind", torch.int64),
    )
    batch.validate()
    return batch


def dispatch_gradcheck(experts: torch.nn.Module, expert_TK: torch.Tensor, dim: int) -> bool:
    """`torch.autograd.gradcheck` of `dispatch` through float64 `experts`, with respect to random
    tokens [T, dim], gates [T, k] and both expert weights."""
    from moesaic.model import dispatch as d

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ex = experts

        def forward(self, x, gate):
            return d.dispatch(x, expert_TK, gate, self.ex)

    def f(x, gate, w1, w2):
        params = {"ex.w_gate_up_EDH": w1, "ex.w_down_EHD": w2}
        return torch.func.functional_call(Layer(), params, (x, gate))

    T, k = expert_TK.shape
    x = torch.randn(T, dim, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    weights = [p.detach().clone().requires_grad_(True) for p in experts.parameters()]
    return torch.autograd.gradcheck(f, (x, gate, *weights))

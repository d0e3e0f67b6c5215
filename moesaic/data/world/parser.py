"""Rule-based scene parser: recovers the objects of a world image without a learned model.

Used to score generated images (design.md §6). For rendered scenes it is exact; for noisy or
generated images it returns its best guess with a confidence in [0, 1].

How (vectorised over a batch of images): the background is the background colour nearest to
the per-channel median of all pixels, which is exact while objects cover less than half of the
image (always for up to 4 objects, so for the default world; see `max_objects`). Each of the
3×3 cells is then explained by every hypothesis "empty" or "(shape, size) mask filled with
palette colour q on the background": the one with the least squared error wins (a
least-squares template fit, so pixel noise averages out over the mask). For a rendered scene
the true hypothesis has error 0 and every other one a positive error, so parsing is exact.
Confidence of a cell = 1 − best error / second-best error (1 for clean renders, near 0 when
two hypotheses explain the pixels equally badly); of a scene = min over its nine cells.

Scenes with more objects (`data.max_objects`) can hide most of the background, so there the
background is fitted too: every background colour is tried and the one whose best cell
hypotheses (plus the border outside the grid) explain the image with the least squared error
wins. No palette colour is a background colour, so for a rendered scene only the true
background reaches error 0 whenever one background pixel shows (always at 16 and 32 pixels,
whose grid leaves a border; at other sizes all but a scene of nine large squares).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesaic.data.world.scenes import (
    BACKGROUND_UNIT,
    COLOUR_UNIT,
    MAX_OBJECTS,
    SIZES,
    Scene,
    SceneObject,
    layout,
)


@dataclasses.dataclass(frozen=True)
class ParsedScene:
    scene: Scene
    confidence: float  # min over cells, in [0, 1]
    object_confidence: tuple[float, ...]  # per object of `scene.objects`


def _hypothesis_errors(X_NKPC: np.ndarray, bg_NC: np.ndarray, masks_TP: np.ndarray) -> np.ndarray:
    """Squared error of every cell hypothesis [N, 9, 1 + T·Q] (0 = empty, 1 + t·Q + q = mask t
    in palette colour q): background outside the mask, the palette colour inside."""
    area_T = masks_TP.sum(-1)
    pal_QC = COLOUR_UNIT.astype(np.float64)
    D_NKP = ((X_NKPC - bg_NC[:, None, None]) ** 2).sum(-1)
    out_NKT = D_NKP @ (1.0 - masks_TP).T
    S1_NKTC = np.einsum("nkpc,tp->nktc", X_NKPC, masks_TP)
    S2_NKT = (X_NKPC**2).sum(-1) @ masks_TP.T
    cross_NKTQ = S1_NKTC @ pal_QC.T
    sse_NKTQ = (
        out_NKT[..., None]
        + S2_NKT[..., None]
        - 2.0 * cross_NKTQ
        + area_T[:, None] * (pal_QC**2).sum(-1)[None, :]
    )
    N = X_NKPC.shape[0]
    empty_NK = D_NKP.sum(-1)
    return np.concatenate([empty_NK[..., None], sse_NKTQ.reshape(N, 9, -1)], -1)


def parse_scenes(images_NHWC: np.ndarray, max_objects: int = MAX_OBJECTS) -> list[ParsedScene]:
    """Parse a batch of images [N, S, S, 3] (values in [-1, 1]) into scenes of at most
    `max_objects` objects (the world's `data.max_objects`; it decides the background rule)."""
    x = np.asarray(images_NHWC, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    N, S = x.shape[0], x.shape[1]
    lay = layout(S)
    c, o = lay.cell, lay.offset
    cells = x[:, o : o + 3 * c, o : o + 3 * c].reshape(N, 3, c, 3, c, 3)
    X_NKPC = cells.transpose(0, 1, 3, 2, 4, 5).reshape(N, 9, c * c, 3)
    M_TP = lay.masks.reshape(len(lay.masks), -1).astype(np.float64)
    if 2 * max_objects * c * c < S * S:  # the background is most of the image: its median
        med_NC = np.median(x.reshape(N, -1, 3), axis=1)
        d_NB = ((med_NC[:, None] - BACKGROUND_UNIT[None]) ** 2).sum(-1)
        bg_idx = d_NB.argmin(-1)
        all_NKH = _hypothesis_errors(X_NKPC, BACKGROUND_UNIT[bg_idx].astype(np.float64), M_TP)
    else:  # fit the background as well (module doc)
        border_SS = np.ones((S, S), dtype=bool)
        border_SS[o : o + 3 * c, o : o + 3 * c] = False
        per_bg = []
        for bg_C in BACKGROUND_UNIT.astype(np.float64):
            errs_NKH = _hypothesis_errors(X_NKPC, np.broadcast_to(bg_C, (N, 3)), M_TP)
            edge_N = ((x[:, border_SS] - bg_C) ** 2).sum((-1, -2))
            per_bg.append((errs_NKH, errs_NKH.min(-1).sum(-1) + edge_N))
        bg_idx = np.stack([total for _, total in per_bg], -1).argmin(-1)
        all_NKH = np.stack([errs for errs, _ in per_bg], 1)[np.arange(N), bg_idx]
    Q = COLOUR_UNIT.shape[0]
    order = np.argsort(all_NKH, axis=-1, kind="stable")[..., :2]
    best_NK = order[..., 0]
    e1 = np.take_along_axis(all_NKH, order[..., :1], -1)[..., 0]
    e2 = np.take_along_axis(all_NKH, order[..., 1:2], -1)[..., 0]
    conf_NK = np.clip(1.0 - e1 / np.maximum(e2, 1e-12), 0.0, 1.0)
    out = []
    for n in range(N):
        objs, confs = [], []
        for k in np.flatnonzero(best_NK[n]):
            t, q = divmod(int(best_NK[n, k]) - 1, Q)
            objs.append(SceneObject(int(k), t // len(SIZES), q, t % len(SIZES)))
            confs.append(float(conf_NK[n, k]))
        scene = Scene(tuple(objs), int(bg_idx[n]))
        out.append(ParsedScene(scene, float(conf_NK[n].min()), tuple(confs)))
    return out


def parse_scene(image_HWC: np.ndarray, max_objects: int = MAX_OBJECTS) -> ParsedScene:
    """Parse one image [S, S, 3]."""
    return parse_scenes(image_HWC[None], max_objects)[0]

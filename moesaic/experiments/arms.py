"""Architecture arms of the competition study: the FFN variant, everything else equal.

Every arm runs the same active FFN compute per token as the dense baseline (3·D·F: one SwiGLU
of width F, or G experts of width F/G), so any difference in the tax comes from how capacity is
shared between modalities, not from more compute. Arms differ in total parameters; the summary
reports total and active parameters next to every number.

    dense                    one SwiGLU of width F shared by both modalities
    modality                 one SwiGLU of width F per modality (hard routing by modality):
                             2× the FFN parameters of dense
    moe                      E experts of width F/G, top-G learned routing (E/G × dense FFN
                             parameters)
    moe-total-matched        2G experts of width F/G, top-G: the same total AND active
                             parameters as `modality`, so learned routing is compared with hard
                             modality routing at identical size and compute
    moe-groups               MoMa: E experts split E/2 text + E/2 image, top-G learned routing
                             inside the token's modality group
    moe-shared-per-modality  E routed experts plus one always-on expert of width F/G per
                             modality; top-(G−1) routed + 1 shared = G active experts
"""

from __future__ import annotations

import dataclasses

from moesaic.errors import ConfigError, did_you_mean


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    description: str
    kind: str
    experts: str = ""  # "E" (the study's experts), "2G", or "" (not an MoE)
    groups: str = "none"
    shared: str = "none"

    def overrides(self, experts: int, granularity: int) -> list[str]:
        """Dotted overrides that turn the study's base model into this arm."""
        out = [f"model.ffn.kind={self.kind}"]
        if self.kind != "moe":
            return out
        n = 2 * granularity if self.experts == "2G" else experts
        return out + [
            f"model.ffn.experts={n}",
            f"model.ffn.granularity={granularity}",
            "model.ffn.top_k=0",
            f"model.ffn.groups={self.groups}",
            f"model.ffn.shared={self.shared}",
        ]


ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("dense", "one SwiGLU FFN of width F for every token", "dense"),
        Arm("modality", "one SwiGLU FFN of width F per modality", "modality"),
        Arm("moe", "E experts of width F/G, top-G learned routing", "moe", experts="E"),
        Arm(
            "moe-total-matched",
            "2G experts of width F/G, top-G: total and active parameters of `modality`",
            "moe",
            experts="2G",
        ),
        Arm(
            "moe-groups",
            "MoMa: E/2 text + E/2 image experts, top-G routing inside the modality group",
            "moe",
            experts="E",
            groups="modality",
        ),
        Arm(
            "moe-shared-per-modality",
            "E experts, one always-on expert per modality + top-(G-1) routed",
            "moe",
            experts="E",
            shared="per_modality",
        ),
    )
}
DEFAULT_ARMS = ("dense", "modality", "moe")


def get_arm(name: str) -> Arm:
    if name not in ARMS:
        raise ConfigError(f"unknown arm '{name}'{did_you_mean(name, ARMS)}")
    return ARMS[name]


def parse_arms(text: str) -> list[str]:
    """'dense,moe' → ['dense', 'moe'] (checked, duplicates removed, order kept)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--arms '{text}' names no arm; e.g. --arms dense,modality,moe")
    for n in names:
        get_arm(n)
    return list(dict.fromkeys(names))


def check_arms(arms: list[str], lr: dict[str, float] | None = None) -> None:
    """A study's `arms` (at least one, each known) and per-arm `lr` (only for those arms)."""
    if not arms:
        raise ConfigError("study.arms is empty; name at least one arm, e.g. [dense, moe]")
    for arm in arms:
        get_arm(arm)
    for arm in lr or {}:
        if arm not in arms:
            raise ConfigError(f"study.lr names arm '{arm}', which is not in study.arms")


def check_routing_choice(experts: int, granularity: int, arms: list[str]) -> None:
    """The MoE arms with E experts need E >= 2G, or routing has nothing to choose."""
    if experts < 2 * granularity and any(get_arm(a).experts == "E" for a in arms):
        raise ConfigError(
            f"study.experts={experts} must be >= 2 x granularity ({granularity}) "
            "so that routing has a choice"
        )

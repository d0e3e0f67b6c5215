"""The unified multimodal transformer and its feed-forward variants (design.md §2–4)."""

from moesaic.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]

"""Figures (matplotlib, Agg) and the self-contained HTML report of a study."""

"""Analysis of trained runs (design.md §5): modality tax, expert specialisation, sparsity.

`tax` and `specialization` and `sparsity` are pure functions of numbers (no model needed);
`runs.analyze_run` applies them to a run directory.
"""

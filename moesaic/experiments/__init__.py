"""Studies that combine many runs: `compete` (the modality tax per architecture arm)."""

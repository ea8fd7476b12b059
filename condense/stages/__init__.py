"""One module per stage: its config dataclass beside its algorithm. Stages never import Ray."""

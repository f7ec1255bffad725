"""Training domain encoders: spatial-continuity siamese, BYOL and supervised LGFFEM."""

METHODS = ("spatial", "byol", "lgffem")

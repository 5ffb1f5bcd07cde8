"""A numpy Flower app whose training is deterministic: both ways must end on the same model."""

"""Hand-written kernels for what XLA compiles poorly, each with the reason in its module."""

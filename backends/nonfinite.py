"""The error of a NaN or infinite result where a finite one is required (a training step, an
evaluation loss, merged weights); the message names the step, tensor or adapter."""


class NonFiniteError(ValueError):
    """A loss, gradient norm or weight is NaN or infinite; nothing non-finite was saved."""

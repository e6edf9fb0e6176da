"""Errors raised for malformed inputs and files."""


class NF4FormatError(ValueError):
    """A quantized state dict or file does not follow the bitsandbytes NF4 layout."""


class ModelLoadError(ValueError):
    """A model, tokenizer or data file cannot be read: the message names the file and the problem."""

"""Models: image encoders, mappers, the captioner and its config, checkpoints, decoding, tiny test models."""

from transformers.utils import logging as transformers_logging


def quiet_transformers() -> None:
    """Turn off the progress bar transformers draws for every model it loads or saves: noise in the scripts,
    which load a handful of models and show their own progress. Called by the scripts, not on import."""
    transformers_logging.disable_progress_bar()

"""Models: image encoders, mappers, the captioner and its config, checkpoints, decoding, tiny test models."""

from transformers.utils import logging as _transformers_logging

# transformers draws a progress bar for every model it loads or saves: noise in these scripts,
# which load a handful of models and show their own progress.
_transformers_logging.disable_progress_bar()

"""Models: image encoders, mappers, the captioner, checkpoints and decoding."""

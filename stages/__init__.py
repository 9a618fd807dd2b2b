"""Stages: each script's flow in the module named for it (extract, train, predict, evaluate, demo),
with torchrun's process group beside them. They use models/ and data/; neither uses them."""

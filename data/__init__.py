"""Data: annotation readers, image loading, feature files, caption datasets, references and
predictions, atomic writes and the synthetic set. It imports nothing from models/ or stages/."""

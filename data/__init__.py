"""Data: annotation readers, image loading, feature files and caption datasets."""

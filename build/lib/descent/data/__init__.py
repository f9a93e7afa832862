"""Data: sources (what the images are), splits (which index goes where), the DataModule (how batches are served)."""

"""The data stage's code: sources (Kaggle, local, phantoms), file records, duplicates, splits, the data report."""

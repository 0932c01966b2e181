"""Decoding (PNG, JPEG, DICOM), the deterministic transforms, THE preprocess function, and the processed arrays."""

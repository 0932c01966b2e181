"""The chestct web service: FastAPI routes (main.py), upload limits (uploads.py) and the static page (static/)."""

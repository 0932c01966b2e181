"""The predictor and the FastAPI service (the app itself is imported only where the service runs)."""

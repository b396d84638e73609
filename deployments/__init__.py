"""When and where the flows run: prefect.yaml, ``leap serve`` and the MLflow webhook endpoint."""

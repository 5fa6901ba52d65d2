"""Prefect flows: the pipeline, scheduled retraining and promotion; and the `drivevla` command."""

"""Prefect tasks: thin wrappers that run stages, DVC operations and the CARLA server resource."""

"""Evaluation metrics shared by the stages."""

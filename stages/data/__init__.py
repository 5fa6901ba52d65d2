"""Datasets: simulator recordings (and, later, nuScenes) turned into training samples."""

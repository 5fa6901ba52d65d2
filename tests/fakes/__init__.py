"""Test doubles of external services (a fake `carla` client in `tests.fakes.fake_carla`)."""

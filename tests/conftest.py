"""Test session plugins: a throwaway PostgreSQL server (tests/pg.py)."""

pytest_plugins = ["tests.pg"]

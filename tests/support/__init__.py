"""Helpers shared by the test suites (real servers, sample data); imported from tests/conftest.py."""

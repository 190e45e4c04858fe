"""Test support: job documents, tiny models and data, and the Kubernetes API emulator.

Import from tests as `from support import jobs` (tests/conftest.py puts tests/ on sys.path).
"""

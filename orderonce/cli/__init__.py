"""The ``orderonce`` command line (entry point ``orderonce.cli:app``)."""

from orderonce.cli.main import app

__all__ = ["app"]

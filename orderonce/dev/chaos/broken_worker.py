"""``python -m orderonce.dev.chaos.broken_worker VARIANT worker ...``: the real CLI with one
guarantee broken (orderonce/dev/chaos/broken.py), for the chaos harness's negative controls.

The one module below the CLI that imports it (the import-linter contract names it): a broken
worker must be started exactly as a correct one is, or a control would test something else.
"""

from __future__ import annotations

import sys

from orderonce.dev.chaos.broken import patch


def main() -> None:
    variant, *argv = sys.argv[1:]
    patch(variant)
    from orderonce.cli import app

    app(argv, prog_name="orderonce")


if __name__ == "__main__":
    main()

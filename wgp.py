#!/usr/bin/env python
"""Wan Studio entry point. ``python wgp.py`` starts the web app; ``python wgp.py --help`` lists
the other commands (models, download, ...). All work happens in the ``wan`` package."""

import sys

from wan.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

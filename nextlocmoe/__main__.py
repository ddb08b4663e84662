"""`python -m nextlocmoe ...` is the `nextlocmoe` command (nextlocmoe.cli), for when the venv's bin/ is not on PATH."""

import sys

from .cli import main

sys.exit(main())

"""``python -m tldr_fast ...``: the command line, also as ``torchrun --nproc-per-node N -m tldr_fast ...``."""

import sys

from .cli import main

sys.exit(main())

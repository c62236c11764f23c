"""``python -m mrprune.bench``: the same as ``mrprune bench``."""

import sys

from . import main

sys.exit(main())

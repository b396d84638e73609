"""``python -m leapcli``: the same as the ``leap`` console script."""

import sys

from leapcli.cli import main

sys.exit(main())

"""``python -m leapcore.attribution``: print the methods table of docs/attribution.md."""

import sys

from leapcore.attribution.registry import methods_markdown

sys.stdout.write(methods_markdown())

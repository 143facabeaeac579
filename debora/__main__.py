"""``python -m debora train …``."""
import sys

from .cli import main

sys.exit(main())

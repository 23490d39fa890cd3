"""``python -m deepmetric`` (and ``torchrun -m deepmetric train ...``)."""
import sys

from .cli import main

sys.exit(main())

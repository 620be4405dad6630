"""``python -m meanflow.cli`` (and ``torchrun ... -m meanflow.cli``): the ``meanflow`` program."""

import sys

from meanflow.cli import main

sys.exit(main())

"""`python -m hwaware`: the same as the `hwaware` command."""

import sys

from hwaware.cli import main

sys.exit(main())

"""``python -m edgec`` is the ``edgec`` command."""

import sys

from edgec.cli import main

sys.exit(main())

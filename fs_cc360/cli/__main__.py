"""``python -m fs_cc360.cli``: the same as the ``fs-cc360`` command."""

import sys

from fs_cc360.cli import main

sys.exit(main())

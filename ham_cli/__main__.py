"""``python -m ham_cli``: the ``ham`` command without the console script."""

import sys

from ham_cli.main import main

sys.exit(main())

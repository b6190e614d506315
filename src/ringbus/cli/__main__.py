"""``python -m ringbus.cli``: the ``ringbus`` command."""

import sys

from ringbus.cli.main import main

sys.exit(main())

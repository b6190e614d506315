"""``python -m ringbus.demo``: the same as ``ringbus demo``."""

import sys

from ringbus.demo.run import main

if __name__ == "__main__":
    sys.exit(main())

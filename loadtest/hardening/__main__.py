"""`python -m loadtest.hardening`: the same as `falconrec hardening` (both call runner.main)."""

import sys

from loadtest.hardening.runner import main

if __name__ == "__main__":
    sys.exit(main())

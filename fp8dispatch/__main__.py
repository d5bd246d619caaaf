"""`python -m fp8dispatch` runs the command line."""

import sys

from fp8dispatch.cli import main

sys.exit(main())

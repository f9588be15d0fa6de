"""`python -m lavin_fast`: the `lavin-fast` command."""

import sys

from lavin_fast.cli.main import main

sys.exit(main())

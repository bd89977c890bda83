"""`python -m tests.tools.reference [--check]`: see tests/tools/reference/__init__.py."""

import sys

from tests.tools.reference.generate import main

sys.exit(main())

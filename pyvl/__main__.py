"""python -m pyvl == the pyvl command."""

import sys

from .cli import main

sys.exit(main())

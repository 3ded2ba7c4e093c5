"""`python -m rdlm.inference`: the generation command line (`rdlm.inference.cli`)."""

import sys

from rdlm.inference.cli import main

sys.exit(main())

"""`python -m rdlm.harness ARGS`: lm-eval's command line, with `--model rdlm`."""

import sys

from rdlm.harness import main

sys.exit(main())

"""`python -m megatron_gvpo.launch`: the command line (cli.py), its exit code as the process's."""

import sys

from megatron_gvpo.launch.cli import main

sys.exit(main())

"""`python -m mtp_ext.cli ...` (also under torchrun): the `mtp-ext` command."""
import sys

from mtp_ext.cli import main

sys.exit(main())

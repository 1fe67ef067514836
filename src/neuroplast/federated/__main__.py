"""`python -m neuroplast.federated ARGS` is `neuroplast federate ARGS`: the entry point torchrun starts."""

import sys

from neuroplast.cli import main

raise SystemExit(main(["federate", *sys.argv[1:]]))

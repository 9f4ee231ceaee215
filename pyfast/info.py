"""`python -m pyfast.info`, kept working: the command lives in `pyfast.cli.info`."""

import sys

from pyfast.cli.info import collect, main

__all__ = ["collect", "main"]

if __name__ == "__main__":
    sys.exit(main())

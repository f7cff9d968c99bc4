"""`python -m cli ...`: the same as the `localitylab` command, for a checkout that is not
installed. (The library has no `python -m localitylab`: it never imports the CLI.)"""

import sys

from cli.main import main

if __name__ == "__main__":
    sys.exit(main())

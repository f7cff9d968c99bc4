"""`python -m localitylab ...`: the same as the `localitylab` command. torchrun starts the
training ranks this way (`torchrun --nproc-per-node N -m localitylab train ...`)."""

import sys

if __name__ == "__main__":
    from cli.main import main

    sys.exit(main())

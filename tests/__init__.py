"""The test suite. A regular package, so that `tests.*` imports find these files even where an
installed distribution ships a top-level `tests` package of its own (torch-fidelity does)."""

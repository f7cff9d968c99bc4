"""The test suite (a package, so that `tests.*` is this folder even where a dependency installs a top-level `tests`)."""

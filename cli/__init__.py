"""The `localitylab` command: a thin Typer shell over the library."""

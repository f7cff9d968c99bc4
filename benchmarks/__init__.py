"""Speed figures for localitylab: `python -m benchmarks` prints a table and writes JSON."""

"""Reports: one HTML page and one PDF comparing how much locality each model learned."""

from localitylab.report.render import build_report

__all__ = ["build_report"]

"""Helpers that tests and developers run by hand: generators of committed files (the
Grafana dashboard) and catalogues read from the code (the metrics it exports)."""

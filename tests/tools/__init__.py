"""Helpers that tests and developers run by hand: generators of committed files (the
chart's golden output, the Grafana dashboard, the references in README.md and
charts/meshgress/README.md) and catalogues read from the code (the metrics it exports)."""

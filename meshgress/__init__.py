"""meshgress's shared core: the API model, the datastore, configuration, the CLI and the lab.

The components (`wireguard/`, `nodeagent/`, `cni/`, `gateway/`) stand on the lower half of
this package (`api`, `selectors`, `config`, `datastore`); the upper half (`cli`, `lab`)
stands on the components. The import contract in pyproject.toml keeps it that way.
"""

__version__ = "0.1.0"

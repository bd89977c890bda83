# meshgress — the two commands are `make demo` and `make test`; both set everything up.
#
# Set-up is idempotent and quiet: Debian packages are installed only when missing, the
# virtualenv is made once, and the project is reinstalled only when pyproject.toml changes.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3

# Debian packages the code and the tests use. --no-install-recommends matters:
# wireguard-tools recommends a kernel image otherwise.
APT_PACKAGES := nftables libnftables1 wireguard-tools wireguard-go iproute2 iputils-ping \
	tcpdump iperf3 conntrack util-linux procps podman runc containernetworking-plugins \
	busybox-static uidmap qemu-system-x86 kmod prometheus graphviz debootstrap

.PHONY: help setup apt venv binaries image demo demo-kube test check bench lab-down clean

help:
	@echo "make demo   - build the lab (a cluster in network namespaces) and show what it proves"
	@echo "make demo-kube - the same lab on a real kube-apiserver, every process under its own RBAC"
	@echo "make test   - run the whole test suite (needs root: it makes network namespaces)"
	@echo "make check  - ruff, mypy and the import contract"
	@echo "make bench  - the benchmarks (not part of the tests)"
	@echo "make image  - the container image, built offline (README \"Container image\")"

setup: apt venv

apt:
	@if [ "$$(id -u)" != 0 ]; then echo "make: run as root (the lab and tests create network namespaces)"; exit 1; fi
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq >/dev/null; \
		apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v 'is ignored' || true
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dev]' 2>&1 | grep -v 'is ignored' || true
	@$(PY) -c 'import meshgress, nftables, pyroute2, hypothesis' || { echo "make: the virtualenv is incomplete"; exit 1; }
	@touch $(STAMP)

# The real programs the tests and the lab run (kube-apiserver, etcd, wireguard-go, kubectl,
# helm), built once from pinned sources into a cache keyed by version (tests/infra/README.md).
binaries: venv
	@$(PY) tests/infra/build-binaries --python $(PY)

# The container image (Containerfile) on a locally debootstrapped base, with the
# wireguard-go built above; cached (tests/infra/build-image). The image test builds it too.
image: apt binaries
	@$(PY) tests/infra/build-image

demo: setup binaries
	@$(VENV)/bin/meshgress lab demo --nodes 2 --gateway-nodes 2

demo-kube: setup binaries
	@$(VENV)/bin/meshgress lab demo --nodes 2 --gateway-nodes 2 --datastore kube

# The kernel WireGuard suite needs a kernel with WireGuard: run-vm runs it natively where
# the host has the module, else in a throwaway QEMU guest with a stock Debian kernel.
test: setup check binaries
	@$(PY) -m pytest -q tests --ignore=tests/kernel
	@tests/kernel/run-vm -q

check: venv
	@$(VENV)/bin/ruff check meshgress wireguard nodeagent cni gateway tests
	@$(VENV)/bin/mypy meshgress wireguard nodeagent cni gateway
	@$(VENV)/bin/lint-imports --no-cache

bench: setup
	@$(PY) tests/bench/run.py

lab-down: venv
	@$(VENV)/bin/meshgress lab down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

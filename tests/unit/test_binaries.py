"""Which wireguard-go agents and gateways run when none is named: the cached current
build when `make binaries` made it, else `wireguard-go` on PATH; `--wireguard-go` wins."""

from __future__ import annotations

import argparse
import os

import pytest

from gateway.options import add_arguments as add_gateway_arguments
from meshgress.binaries import (
    WIREGUARD_GO_ON_PATH,
    WIREGUARD_GO_VERSION,
    cached_wireguard_go,
    default_wireguard_go,
)
from meshgress.lab.controlplane import PINNED_VERSIONS
from nodeagent.options import add_arguments as add_agent_arguments


def test_the_cached_build_is_the_default_when_it_is_there(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHGRESS_CACHE", str(tmp_path))
    assert default_wireguard_go() == WIREGUARD_GO_ON_PATH
    binary = tmp_path / "bin" / f"wireguard-go-{WIREGUARD_GO_VERSION}" / "wireguard-go"
    assert cached_wireguard_go() == binary
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    assert default_wireguard_go() == WIREGUARD_GO_ON_PATH  # not executable: not a program
    os.chmod(binary, 0o755)
    assert default_wireguard_go() == str(binary)


def test_the_lab_control_plane_finds_the_same_pinned_build():
    assert PINNED_VERSIONS["wireguard-go"] == WIREGUARD_GO_VERSION


def test_agent_and_gateway_take_a_wireguard_go_option():
    for add in (add_agent_arguments, add_gateway_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        base = ["--node", "n1", "--datastore", "/tmp/store"]
        assert parser.parse_args(base).wireguard_go is None
        chosen = parser.parse_args([*base, "--wireguard-go", "/opt/wg/wireguard-go"])
        assert chosen.wireguard_go == "/opt/wg/wireguard-go"


def test_every_command_refuses_an_unknown_wireguard_backend_before_doing_anything(capsys):
    from meshgress.cli import build_parser

    tools = build_parser()
    for argv in (["status", "--node", "node1"], ["wg-config"]):
        assert tools.parse_args([*argv, "--wireguard-backend", "userspace"]) \
            .wireguard_backend == "userspace"
        with pytest.raises(SystemExit) as exited:
            tools.parse_args([*argv, "--wireguard-backend", "kernal"])
        assert exited.value.code == 2
        assert "invalid choice: 'kernal'" in capsys.readouterr().err

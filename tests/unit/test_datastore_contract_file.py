"""The Datastore contract (tests/datastore_contract.py) on the `file` backend. What only
the file backend promises (its layout, journal, crash recovery, processes sharing a
directory) is in test_file_datastore.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from meshgress.datastore import Datastore
from meshgress.datastore.file import FileDatastore
from tests.datastore_contract import DatastoreContract, FakeClock

pytestmark = pytest.mark.timeout(60)


class TestFileDatastoreContract(DatastoreContract):
    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def store(self, tmp_path: Path, clock: FakeClock) -> Iterator[FileDatastore]:
        s = FileDatastore(tmp_path / "store", poll_interval=0.01, clock=clock)
        yield s
        s.close()

    @pytest.fixture
    def other(self, tmp_path: Path, clock: FakeClock) -> Iterator[Callable[[], Datastore]]:
        opened: list[FileDatastore] = []

        def open_another() -> Datastore:
            opened.append(FileDatastore(tmp_path / "store", poll_interval=0.01, clock=clock))
            return opened[-1]

        yield open_another
        for s in opened:
            s.close()

"""Unit tests of the engine's pieces: the multipart transfer's states, bounded submission."""

from __future__ import annotations

import threading

import pytest

from archup.dispatch import ByteBudget, Dispatcher, Reservation
from archup.errors import ArchupError, DestinationError
from archup.journal import FileRecord
from archup.multipart import MultipartTransfer, TransferState
from archup.states import FileState
from archup.store import MultipartChecksum


def _transfer(expected: str | None = None) -> MultipartTransfer:
    record = FileRecord("B", "a.bin", "k/a.bin", 10, 1, FileState.UPLOADING, 5, "U", None, None, None, 1, "")
    return MultipartTransfer(record, "U", 5, MultipartChecksum("CRC32", full_object=True), expected)


def test_a_transfer_finishes_once_when_read_and_nothing_is_in_flight() -> None:
    transfer = _transfer()
    transfer.part_started()
    transfer.part_started()
    assert transfer.reader_ended(read_all=True, sha256="s", error=None) is False  # parts in flight
    assert transfer.part_ended() is False
    assert transfer.part_ended() is True  # the last one out finishes it
    assert transfer.ending is TransferState.READ and transfer.state is TransferState.FINISHED
    assert transfer.sha256 == "s"
    transfer.part_started()  # a straggler after the end can never finish it again
    assert transfer.part_ended() is False


def test_a_failure_while_reading_ends_the_transfer_failed_and_keeps_the_first_reason() -> None:
    transfer = _transfer()
    transfer.part_started()
    transfer.fail("UploadPart: 500")
    assert not transfer.live
    transfer.fail("a second reason", lost=True)
    assert transfer.part_ended() is True  # nothing in flight, and the file will not be read further
    assert transfer.ending is TransferState.FAILED and transfer.reason == "UploadPart: 500"
    assert transfer.lost  # NoSuchUpload is remembered whatever came first
    assert transfer.reader_ended(read_all=False, sha256="s", error=None) is False


def test_a_stop_leaves_the_upload_interrupted_not_failed() -> None:
    transfer = _transfer()
    transfer.interrupt()
    transfer.fail("later")
    assert transfer.reader_ended(read_all=False, sha256="s", error=None) is True
    assert transfer.ending is TransferState.INTERRUPTED and transfer.reason is None


@pytest.mark.parametrize("read_all,error,expected,ending", [
    (False, None, None, TransferState.INTERRUPTED),
    (False, "vanished: no such file", None, TransferState.FAILED),
    (True, None, "other", TransferState.FAILED),
    (True, None, "s", TransferState.READ),
])
def test_how_the_reader_ends_decides_the_ending(read_all: bool, error: str | None, expected: str | None,
                                                ending: TransferState) -> None:
    transfer = _transfer(expected)
    assert transfer.reader_ended(read_all=read_all, sha256="s", error=error) is True
    assert transfer.ending is ending


def test_the_dispatcher_releases_slot_and_bytes_once_however_a_task_ends() -> None:
    errors: list[ArchupError] = []
    dispatcher = Dispatcher(2, 10, errors.append)
    ran = threading.Event()

    def fine() -> None:
        ran.set()

    def denied() -> None:
        raise DestinationError("AccessDenied")

    def bug() -> None:
        raise ValueError("oops")

    with dispatcher.running():
        for task in (fine, denied, bug) * 3:
            dispatcher.submit(task, reservation=dispatcher.reserve(10))  # the whole budget each: one at a time
    assert ran.is_set()
    assert [type(e) for e in errors].count(DestinationError) == 3
    assert sum("internal error in an upload worker" in str(e) for e in errors) == 3
    assert dispatcher.budget.available == 10  # every byte came back


def test_a_reservation_is_given_back_exactly_once() -> None:
    budget = ByteBudget(10)
    reservation = Reservation(budget, 6)
    assert budget.available == 4
    reservation.release()
    reservation.release()
    assert budget.available == 10
    with pytest.raises(AssertionError):
        Dispatcher(1, 10, lambda error: None).submit(lambda: None)  # only inside running()

"""archup's named errors and the one table that maps them to exit codes.

Every message says what failed, with the value, and what to do next. The CLI
prints ``str(error)`` on one line and exits with ``exit_code_for(error)``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes archup documents (README, ``archup --help``)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    PARTIAL = 3
    BUSY = 4
    DESTINATION = 5
    LATER = 75  # sysexits' EX_TEMPFAIL: nothing failed, run the same command again later
    INTERRUPTED = 130


class ArchupError(Exception):
    """Base of every error archup reports to a user."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(ArchupError):
    """Bad input: a missing directory, a malformed batch id, a bad option."""

    exit_code = ExitCode.USAGE


class BatchNotFound(UsageError):
    """The journal has no batch with this id."""


class JournalError(ArchupError):
    """The journal cannot be opened, read or written."""


class JournalBusy(JournalError):
    """Another writer held the journal past the busy timeout."""

    exit_code = ExitCode.BUSY


class JournalUnavailable(JournalError):
    """A shared journal's database stayed unreachable past the retries; the batch is resumable."""

    exit_code = ExitCode.PARTIAL


class JournalAuthenticationFailed(JournalError):
    """The shared journal's database refused this user's credentials (not retried)."""

    exit_code = ExitCode.DESTINATION


class LeaseLost(JournalError):
    """This host's claim on a batch's files ran out and another host may have taken them; its
    writes are refused (the fence), and it stops sending. The batch is resumable."""

    exit_code = ExitCode.PARTIAL


class SourceMismatch(ArchupError):
    """This host's source is not the tree the batch was scanned from."""

    exit_code = ExitCode.USAGE


class UnsafeJournalPath(JournalError):
    """The journal's file or directory (or its locks/) is a symlink, another user's, or writable by others."""


class EndpointMismatch(UsageError):
    """A batch's recorded endpoint is not the one this host is configured for: a journal row
    must not decide where requests (signed with this host's credentials) go."""

    def __init__(self, batch_id: str, recorded: str | None, configured: str | None) -> None:
        super().__init__(
            f"batch {batch_id} records endpoint {recorded or 'AWS (the default)'}, and this host is configured "
            f"for {configured or 'AWS (the default)'} (--endpoint-url, ARCHUP_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, "
            "AWS_ENDPOINT_URL or the config file); archup sends nowhere a journal row alone names: configure "
            f"{recorded or 'no endpoint'} here, or pass --trust-recorded-endpoint if the journal's record is "
            "to be trusted")
        self.batch_id = batch_id
        self.recorded = recorded
        self.configured = configured


class JournalTooNew(JournalError):
    """The journal was written by a newer archup (schema version too high)."""


class IllegalTransition(ArchupError):
    """A batch or file was asked to move to a state it cannot reach from its current one."""


class FileNotInBatch(IllegalTransition):
    """A file was completed or failed that the batch never added."""

    def __init__(self, batch_id: str, rel_path: str) -> None:
        super().__init__(f"File not found in batch: batch {batch_id} has no file {rel_path!r}")
        self.batch_id = batch_id
        self.rel_path = rel_path


class FileAlreadyUploaded(IllegalTransition):
    """A file that is already uploaded was completed a second time."""

    def __init__(self, batch_id: str, rel_path: str) -> None:
        super().__init__(f"batch {batch_id}: file {rel_path!r} is already uploaded")
        self.batch_id = batch_id
        self.rel_path = rel_path


class BatchExists(IllegalTransition):
    """A batch was to be created where one is: the same id, or an unfinished batch of the same
    source and destination (``existing`` names it)."""

    def __init__(self, message: str, existing: str) -> None:
        super().__init__(message)
        self.existing = existing


class BatchClosed(IllegalTransition):
    """A file was added to a batch that is finalizing, finalized, aborted or expired."""


class BatchBusy(ArchupError):
    """Another archup process owns this batch."""

    exit_code = ExitCode.BUSY


class BatchIncomplete(ArchupError):
    """Finalize was refused: some files are not uploaded, or the scan never finished."""

    exit_code = ExitCode.PARTIAL


class DestinationError(ArchupError):
    """The bucket or the credentials are unusable (unreachable, denied, missing)."""

    exit_code = ExitCode.DESTINATION

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # the S3 error code, if the server gave one


class TransferError(ArchupError):
    """One request to the store failed after its retries; the file is failed, the batch goes on."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class ManifestConflict(ArchupError):
    """A different manifest already exists under the batch prefix."""


class VerificationFailed(ArchupError):
    """verify found differences between the bucket and the batch's manifest or journal."""

    exit_code = ExitCode.PARTIAL


class UnsupportedManifest(ArchupError):
    """The manifest was written in a newer format than this archup reads."""


class SealBroken(ArchupError):
    """restore: the manifest's seal does not hold (or is not the one the journal recorded);
    nothing was written."""

    exit_code = ExitCode.PARTIAL


class RestoreIncomplete(ArchupError):
    """restore: some files could not be restored or were refused (each named); the rest are in place."""

    exit_code = ExitCode.PARTIAL


class ThawPending(ArchupError):
    """restore: archived objects are thawing; nothing failed, run the same command again later."""

    exit_code = ExitCode.LATER


class Interrupted(ArchupError):
    """The run was stopped by SIGINT or SIGTERM; the batch is resumable."""

    exit_code = ExitCode.INTERRUPTED


def exit_code_for(error: BaseException) -> int:
    """The one place errors become exit codes."""
    if isinstance(error, ArchupError):
        return int(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.ERROR)


EXIT_CODE_TABLE: tuple[tuple[int, str], ...] = (
    (ExitCode.OK, "batch complete (finalized), or the command did what it was asked"),
    (ExitCode.ERROR, "error (journal unusable, manifest conflict, unexpected failure)"),
    (ExitCode.USAGE, "usage or bad input: missing directory, malformed or unknown batch id, bad option; a host whose source is not the batch's"),
    (ExitCode.PARTIAL, "partial: some files failed or are not uploaded (the batch is resumable), or could not be read (the batch is sealed without them); a shared journal unreachable past the retries, or a host that lost its lease (the batch is resumable, other hosts go on)"),
    (ExitCode.BUSY, "busy: another archup owns the batch or holds the journal"),
    (ExitCode.DESTINATION, "destination or credentials unusable"),
    (ExitCode.LATER, "later: restore asked for archived objects to be thawed; run the same command again once they are (or use --wait)"),
    (ExitCode.INTERRUPTED, "interrupted (SIGINT/SIGTERM); the batch is resumable"),
)

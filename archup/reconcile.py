"""Crash reconciliation: what a crash or a lost answer leaves in the bucket, settled.

Each case is settled from evidence, never guessed: a PutObject whose commit a crash
lost (the object is there with the file's SHA-256), a CompleteMultipartUpload whose
answer was lost (the object is there with the ETag the recorded parts imply), a
multipart upload the journal never recorded (an orphan, aborted), and the uploads a
batch still has open when it is aborted or expires.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from .checksums import multipart_etag
from .errors import DestinationError, FileNotInBatch, TransferError
from .journal import BatchRecord, FileRecord, Journal
from .outcomes import Outcomes
from .scan import FILES_DIR
from .source import FileChanged, SourceTree
from .states import FileState
from .store import SHA256_METADATA, ObjectStore

log = logging.getLogger("archup.batches")


def list_open_uploads(store: ObjectStore, prefix: str) -> list[tuple[str, str]] | None:
    """(key, upload id) of the multipart uploads in progress under a prefix; None if the
    server will not list them: NotImplemented (s3rver), or AccessDenied (an upload-only
    IAM policy without s3:ListBucketMultipartUploads). An orphan left by a crash is then
    for the bucket's lifecycle rule (AbortIncompleteMultipartUpload) to clean."""
    try:
        return list(store.list_multipart_uploads(prefix))
    except (TransferError, DestinationError) as error:
        if error.code in ("NotImplemented", "501"):
            log.info("the server cannot list multipart uploads under %s", prefix)
        elif error.code == "AccessDenied":
            log.warning("may not list multipart uploads under s3://%s/%s (AccessDenied): uploads orphaned by "
                        "a crash are left to the bucket's lifecycle rule", store.bucket, prefix)
        else:
            raise
    return None


def abort_leftover_uploads(store: ObjectStore, batch: BatchRecord) -> None:
    """Every file is uploaded, so a multipart upload still open under the batch is a leftover:
    a retried CreateMultipartUpload whose first answer was lost, or a crash's orphan. The
    batch is sealed with none left behind, unless the server will not list them."""
    for key, upload_id in list_open_uploads(store, batch.batch_prefix) or []:
        store.abort_multipart(key, upload_id)


def abort_uploads(journal: Journal, store: ObjectStore, batch: BatchRecord, reason: str) -> int:
    """Abort the batch's multipart uploads in progress and return how many.

    Those the journal records are its files still uploading: an uploaded file keeps
    the id of its completed upload, which is no longer there to abort. Each such
    file is failed with ``reason`` once its upload is aborted, so a second run
    neither aborts nor counts it again. Then any other upload under the batch
    prefix (left by a crash before its id was recorded) is aborted too.
    """
    aborted: set[str] = set()
    # Materialized first: failing a file while paging through the files would move the pages.
    uploading = list(journal.iter_files(batch.batch_id, [FileState.UPLOADING]))
    for record in uploading:
        if record.upload_id is None:
            continue
        store.abort_multipart(record.key, record.upload_id)
        aborted.add(record.upload_id)
        if not batch.state.terminal:  # a closed batch's files can no longer change
            journal.fail_file(batch.batch_id, record.rel_path, reason)
    for key, upload_id in list_open_uploads(store, batch.batch_prefix) or []:
        if upload_id not in aborted:
            store.abort_multipart(key, upload_id)
            aborted.add(upload_id)
    return len(aborted)


class Reconciler:
    """Settles, for one batch being sent, what an earlier crash or a lost answer left."""

    def __init__(self, journal: Journal, store: ObjectStore, batch: BatchRecord, tree: SourceTree,
                 outcomes: Outcomes, multipart_threshold: int) -> None:
        self.journal = journal
        self.store = store
        self.batch = batch
        self.tree = tree
        self.outcomes = outcomes
        self.multipart_threshold = multipart_threshold

    def sweep_orphan_uploads(self) -> int:
        """Abort multipart uploads under this batch's prefix that the journal does not know.

        They are what a crash between CreateMultipartUpload and the journal's
        commit of its id leaves behind. Returns how many were aborted.
        """
        known = self.journal.upload_ids(self.batch.batch_id)
        aborted = 0
        for key, upload_id in list_open_uploads(self.store, self.batch.batch_prefix) or []:
            if upload_id not in known:
                self.store.abort_multipart(key, upload_id)
                aborted += 1
        return aborted

    def settle_lost_puts(self, limit: int = 10_000) -> int:
        """On a resume: the files a crash caught after their PutObject but before the journal
        committed them are in the bucket already. Settled, never guessed: a pending file whose
        object is there with its size and an ``archup-sha256`` equal to the SHA-256 of the file
        read now is recorded uploaded instead of sent again. Returns how many.

        Files are sent in key order, so those objects lie at or after the first pending key:
        one listing from there (a page for a batch that stopped cleanly), at most ``limit``."""
        batch_id = self.batch.batch_id
        first = next(iter(self.journal.iter_files(batch_id, [FileState.PENDING])), None)
        if first is None:
            return 0
        files_prefix = self.batch.batch_prefix + FILES_DIR

        def recorded(key: str) -> FileRecord | None:
            try:
                return self.journal.get_file(batch_id, key[len(files_prefix):])
            except FileNotInBatch:
                return None

        return self._settle(first.key, recorded, limit)

    def settle_lost_puts_among(self, records: list[FileRecord]) -> int:
        """The same for the files of one chunk that another host held before this one (it may
        have died after a PutObject and before its commit): one listing over the chunk's keys."""
        pending = {record.key: record for record in records if record.state is FileState.PENDING}
        if not pending:
            return 0
        first, last = min(pending), max(pending)
        return self._settle(first, pending.get, len(records) * 4, last)

    def _settle(self, first_key: str, recorded: Callable[[str], FileRecord | None], limit: int,
                last_key: str | None = None) -> int:
        settled = 0
        files_prefix = self.batch.batch_prefix + FILES_DIR
        listed = self.store.list_objects(files_prefix, start_after=first_key[:-1])
        for found in itertools.islice(listed, limit):
            if last_key is not None and found.key > last_key:
                break
            record = recorded(found.key)
            if (record is None or record.state is not FileState.PENDING or record.key != found.key
                    or found.size != record.size or record.size >= self.multipart_threshold):
                continue
            stored = self.store.head(found.key)
            if stored is None or not stored.metadata.get(SHA256_METADATA):
                continue
            try:
                sha256 = self.tree.hash_file(record)
            except (OSError, FileChanged):
                continue  # sent again, and the read reports what is wrong
            if sha256 == stored.metadata[SHA256_METADATA] and stored.size == record.size:
                self.outcomes.uploaded(record, sha256, stored.etag)
                settled += 1
        return settled

    def settle_lost_completion(self, record: FileRecord) -> bool:
        """The upload is gone: if CompleteMultipartUpload did succeed (its answer was lost),
        the object is there with the ETag the recorded parts imply. Never guessed: settled
        only on that match, and with the SHA-256 of a fresh read of the file."""
        parts = self.journal.list_parts(self.batch.batch_id, record.rel_path)
        found = self.store.head(record.key)
        if not parts or found is None or found.size != record.size or found.etag != multipart_etag(parts):
            return False
        try:
            sha256 = self.tree.hash_file(record)
        except (OSError, FileChanged):
            return False
        self.outcomes.uploaded(record, sha256, found.etag)
        return True

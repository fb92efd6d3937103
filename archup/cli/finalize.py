"""archup finalize: write the manifest and mark the batch enqueued (idempotent)."""

from __future__ import annotations

from ..finalize import finalize as finalize_batch
from ..lock import BatchLock
from .common import (
    BatchArgument,
    EndpointOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    RegionOption,
    check_batch_id,
    emit_json,
    handles_errors,
    open_journal,
    print_fields,
    store_for_batch,
)


@handles_errors
def finalize(batch_id: BatchArgument, endpoint_url: EndpointOption = None, profile: ProfileOption = None,
             region: RegionOption = None, journal_path: JournalOption = None,
             json_output: JsonOption = False) -> None:
    """Seal a batch: check the bucket, write its manifest once, mark it enqueued. Safe to repeat."""
    batch_id = check_batch_id(batch_id)
    with open_journal(journal_path, create=False) as journal:
        batch = journal.get_batch(batch_id)
        store = store_for_batch(batch, endpoint_url, profile, region)
        with BatchLock(journal.path, batch_id):
            summary = finalize_batch(journal, store, batch_id)
    if json_output:
        emit_json(summary.as_dict())
    else:
        print_fields(list(summary.as_dict().items()))

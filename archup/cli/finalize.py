"""archup finalize: write the manifest and mark the batch enqueued (idempotent)."""

from __future__ import annotations

from .common import check_batch_id, emit_json, handles_errors, open_journal, print_fields, transport
from .options import (
    BatchArgument,
    EndpointOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    RegionOption,
    TrustEndpointOption,
)


@handles_errors
def finalize(batch_id: BatchArgument, endpoint_url: EndpointOption = None, profile: ProfileOption = None,
             region: RegionOption = None, journal_path: JournalOption = None,
             json_output: JsonOption = False, trust_recorded_endpoint: TrustEndpointOption = False) -> None:
    """Seal a batch: check the bucket, write its manifest once, mark it enqueued. Safe to repeat."""
    from ..run import finalize_batch, store_factory

    batch_id = check_batch_id(batch_id)
    stores = store_factory(transport(endpoint_url, profile, region, trust_recorded_endpoint=trust_recorded_endpoint))
    with open_journal(journal_path, create=False) as journal:
        summary = finalize_batch(journal, batch_id, stores)
    if json_output:
        emit_json(summary.as_dict())
    else:
        print_fields(list(summary.as_dict().items()))

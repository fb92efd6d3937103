"""archup verify: re-check the bucket against a batch's manifest (or its journal before finalize)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..scan import display_path
from ..verify import DEFAULT_PARALLEL, Difference, Problem, verify_batch
from .common import check_batch_id, emit_json, handles_errors, open_journal, transport
from .options import (
    BatchArgument,
    EndpointOption,
    JournalOption,
    JsonOption,
    ProfileOption,
    RegionOption,
    TrustEndpointOption,
)

MAX_PARALLEL = 256
_BYTE_COUNTS = frozenset({Problem.MISSING, Problem.UNEXPECTED, Problem.SIZE_MISMATCH,
                          Problem.ENTRIES_SIZE_MISMATCH, Problem.TOTAL_BYTES_MISMATCH, Problem.OUTSIDE_SHARD,
                          Problem.SHARDS_SIZE_MISMATCH})


def describe(difference: Difference) -> str:
    """One line per difference; plain text, since paths are user file names."""

    def show(value: object) -> str:
        if value is None:
            return "no object"
        if difference.problem in _BYTE_COUNTS and isinstance(value, int):
            return f"{value} byte" + ("" if value == 1 else "s")
        return str(value)

    name = difference.path or difference.key or "(batch)"
    if difference.path and difference.key and "/shards/" in difference.key:
        name = f"{difference.path} (in {difference.key.rsplit('/', 1)[-1]})"  # a member: which shard
    # Names, keys and found values come from the bucket: escaped, so none reaches the terminal raw.
    return display_path(f"{difference.problem.value}: {name}: expected {show(difference.expected)}, "
                        f"found {show(difference.actual)}")


@handles_errors
def verify(batch_id: BatchArgument,
           deep: Annotated[bool, typer.Option("--deep", help="Download every object and re-hash its bytes "
                                              "(SHA-256); every shard of a packed batch whole and each "
                                              "of its files at its offset.")] = False,
           parallel: Annotated[int, typer.Option("--parallel", "-p", help="Concurrent requests "
                                                 "(HEAD, or GET with --deep).")] = DEFAULT_PARALLEL,
           endpoint_url: EndpointOption = None, profile: ProfileOption = None, region: RegionOption = None,
           journal_path: JournalOption = None, json_output: JsonOption = False,
           trust_recorded_endpoint: TrustEndpointOption = False) -> None:
    """Check the bucket against a batch's manifest (or its journal, before finalize): missing, changed
    and unexpected objects (files, and a packed batch's shards). Exits 3 on any difference."""
    from ..run import store_factory

    batch_id = check_batch_id(batch_id)
    if not 1 <= parallel <= MAX_PARALLEL:
        raise UsageError(f"--parallel {parallel}: must be between 1 and {MAX_PARALLEL}")

    def print_difference(difference: Difference) -> None:
        print(describe(difference), flush=True)

    with open_journal(journal_path, create=False) as journal:
        batch = journal.get_batch(batch_id)
        store = store_factory(transport(endpoint_url, profile, region, trust_recorded_endpoint=trust_recorded_endpoint,
                                        max_pool_connections=max(10, parallel + 2)))(batch)
        report = verify_batch(journal, store, batch_id, deep=deep, parallel=parallel,
                              on_difference=None if json_output else print_difference)
    if json_output:
        emit_json(report.as_dict())
    else:
        how = "re-hashed" if deep else "checked"
        packed = (f" ({report.files_packed} of them in {report.shards_checked} shard(s))" if report.packed
                  else "")
        print(f"batch {batch_id}: {report.checked} file(s) {how}{packed} against the {report.source.value}: "
              f"{report.total_differences} difference(s)"
              + (f" ({report.omitted} not listed)" if report.omitted else ""))
    if not report.ok:
        raise report.failure()

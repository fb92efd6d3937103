"""The options several commands share, defined once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ArchupError
from ..store import ChecksumMode, TransportKind


def complete_batch(ctx: typer.Context, incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of BATCH: the journal's batch ids, each with its state and destination.

    Opened read-only (never created, never migrated, never written); no journal, an
    unreadable one or one of another schema completes nothing rather than failing."""
    from ..journal import SQLiteJournal, is_shared_location
    from ..locations import journal_location

    location = journal_location(ctx.params.get("journal_path"))
    path = Path(location)
    if is_shared_location(location) or not path.is_file():
        return []
    try:
        journal = SQLiteJournal(path, read_only=True, busy_timeout=1.0)
    except ArchupError:
        return []
    try:
        batches = journal.list_batches()
    except ArchupError:
        return []
    finally:
        journal.close()
    wanted = incomplete.upper()
    return [(batch.batch_id, f"{batch.state.value}: {batch.source_root} -> s3://{batch.bucket}/{batch.prefix}")
            for batch in batches if batch.batch_id.startswith(wanted)]


JournalOption = Annotated[
    str | None,
    typer.Option("--journal", help="Journal: a file (SQLite, one host), or a postgresql:// URL that several "
                 "hosts share (no password in it: libpq reads PGPASSWORD, ~/.pgpass, PGSERVICE) "
                 "[env var: ARCHUP_JOURNAL; default: ~/.local/state/archup/journal.db]",
                 show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")]
BatchArgument = Annotated[str, typer.Argument(help="Batch id (a ULID, as printed by 'archup upload').",
                                               metavar="BATCH", autocompletion=complete_batch,
                                               show_default=False)]
EndpointOption = Annotated[
    str | None,
    typer.Option("--endpoint-url", help="S3 endpoint URL [env var: ARCHUP_ENDPOINT_URL, AWS_ENDPOINT_URL]",
                 show_default=False),
]
TrustEndpointOption = Annotated[bool, typer.Option(
    "--trust-recorded-endpoint", help="Accept a batch whose recorded endpoint is not the one configured here "
    "(none configured: AWS); its requests then go to the configured endpoint, or to the recorded one if "
    "none is. Without it such a batch is refused (exit 2): a journal row alone never redirects requests.")]
ProfileOption = Annotated[str | None, typer.Option("--profile", help="AWS profile name.", show_default=False)]
RegionOption = Annotated[str | None, typer.Option("--region", help="Region of the bucket.", show_default=False)]

# -- the commands that send (upload, resume) --------------------------------------


class RetryMode(str, Enum):
    STANDARD = "standard"
    ADAPTIVE = "adaptive"


ParallelOption = Annotated[int, typer.Option("--parallel", "-p", envvar="ARCHUP_PARALLEL",
                                             help="Concurrent requests (threads).")]
ResumeParallelOption = Annotated[int | None, typer.Option(
    "--parallel", "-p", envvar="ARCHUP_PARALLEL", show_default=False,
    help="Concurrent requests (threads) [default: as the batch was started]")]
NoFinalizeOption = Annotated[bool, typer.Option("--no-finalize", help="Upload only; finalize later.")]
ChecksumOption = Annotated[ChecksumMode, typer.Option(
    "--checksum", help="Integrity check sent with every request (sha256, crc32, md5, none).")]
FullObjectOption = Annotated[bool, typer.Option(
    "--full-object-checksum/--no-full-object-checksum",
    help="Multipart objects keep a CRC64NVME of the whole object (CRC32 where the endpoint refuses "
    "CRC64NVME), checked by the server at completion (with --checksum sha256 or crc32); off for "
    "endpoints that reject ChecksumType FULL_OBJECT.")]
GraceOption = Annotated[float, typer.Option(
    "--grace", help="Seconds a first SIGINT/SIGTERM leaves the requests in flight to finish before "
    "archup exits 130 at once (a second signal exits at once).")]
RetriesOption = Annotated[int, typer.Option("--retries", help="Retries of a failed request (N + 1 attempts).")]
RetryModeOption = Annotated[RetryMode, typer.Option(
    "--retry-mode", help="standard, or adaptive (also slows down on 503 SlowDown / 429).")]
TransportOption = Annotated[TransportKind, typer.Option(
    "--transport", envvar="ARCHUP_TRANSPORT",
    help="What sends each small file's PutObject: crt (the AWS Common Runtime's S3 client: signing and "
    "HTTP in C) or botocore. Multipart uploads, listings and the manifest always use botocore; "
    "--retry-mode adaptive sends with botocore.")]
BwlimitOption = Annotated[str | None, typer.Option(
    "--bwlimit", help="Average upload bandwidth limit in bytes per second (e.g. 10MiB).", show_default=False)]
TimeoutOption = Annotated[float, typer.Option(
    "--timeout", help="Seconds to wait for an answer to a request before it counts as failed and is retried "
    "(the read timeout).")]
ConnectTimeoutOption = Annotated[float, typer.Option(
    "--connect-timeout", help="Seconds to wait for a connection to the endpoint.")]
FollowOption = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Take a symlink to a file or directory inside DIR as what it points to; "
    "links out of DIR, dangling links and loops are skipped. A batch keeps the choice it was started with.")]
PrehashOption = Annotated[bool, typer.Option(
    "--prehash/--no-prehash",
    help="Hash each multipart file before sending it, so its object metadata carries its SHA-256 "
    "(a second read of large files, as rclone does). Off by default: the SHA-256 from the upload's own "
    "read is in the journal and the manifest either way.")]

SourceRootOption = Annotated[str | None, typer.Option(
    "--source-root", help="Where this host finds the batch's source, if it mounts it elsewhere than the "
    "batch recorded (hosts sharing a postgresql:// journal).", show_default=False)]
LeaseOption = Annotated[float, typer.Option(
    "--lease", envvar="ARCHUP_LEASE", help="Seconds a host's claim on files of a shared (postgresql://) batch "
    "lasts without a heartbeat; after it another host takes them over.")]

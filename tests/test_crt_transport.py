"""--transport crt: a source file's PutObject through the CRT's S3 client.

What this module proves, beyond the behaviour tests that run on both transports
(``both_transports`` in test_faults, test_throttle, test_crash, test_cron_output,
test_cli_errors, test_journal_faults):

- the CRT is really what sends the files (the proxy sees its User-Agent, and botocore's
  for every other request), and --transport botocore really is botocore;
- an object stored through the CRT is the object botocore stores: the same bytes, user
  metadata, content type, storage class, tags, encryption and checksum;
- keys that need quoting (spaces, non-ASCII, ``+ % ? # ~ =``) land under their own name;
- the addressing (path-style, virtual-hosted, region) is botocore's;
- a failure of botocore's credential chain reaches the user as itself, exit 5;
- keys that cannot change reach the CRT once (a static provider: no call into Python per
  request), refreshable ones are asked for at each signature and a refreshed key is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import TRANSPORTS, Cli
from faultproxy import FaultProxy, RequestHead, Rule
from test_crash import write_tree

from archup.errors import DestinationError, ExitCode
from archup.store import S3Store, StoreConfig, TransportKind, open_store
from archup.store.crt import Credentials, CrtPut, CrtPutStore, Endpoint, quote_key
from archup.store.retry import RetryPolicy

SOURCE_FILES = {
    "plain.txt": b"plain\n",
    "with space/and+plus.bin": bytes(range(256)) * 4,
    "ünïcode/日本語.txt": "utf-8 name\n".encode(),
    "odd/%41?q=1#frag~tilde&amp=.txt": b"needs quoting\n",
    "empty.txt": b"",
}


def _recording(proxy: FaultProxy) -> list[RequestHead]:
    """Every request head the proxy sees (a rule that matches none)."""
    heads: list[RequestHead] = []
    proxy.add_rule(Rule(lambda head: heads.append(head) is not None, "500"))
    return heads


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_the_chosen_transport_is_what_sends_the_files(kind: str, moto_endpoint: str, bucket: str, s3: Any,
                                                      tmp_path: Path, journal_path: Path) -> None:
    source = write_tree(tmp_path / "src", SOURCE_FILES)
    with FaultProxy(moto_endpoint) as proxy:
        heads = _recording(proxy)
        result = Cli(proxy.url, bucket, journal_path)("upload", "--json", "--transport", kind, str(source))
    assert result.exit_code == 0, result.stderr
    puts = [head for head in heads if head.operation == "PutObject" and not head.header("If-None-Match")]
    others = [head for head in heads if head not in puts]
    # Every file, the batch's marker and the manifest's entries.
    assert len([head for head in puts if "/files/" in head.path]) == len(SOURCE_FILES)
    agents = {(head.header("User-Agent") or "").split("/")[0] for head in puts}
    assert agents == ({"CRTS3NativeClient"} if kind == "crt" else {"Boto3"}), agents
    # The preflight, the manifest's summary (If-None-Match: *), listings: botocore on either.
    assert others and all((head.header("User-Agent") or "").startswith("Boto3/") for head in others)
    summary = json.loads(result.stdout)
    prefix = f"staging/{summary['batch_id']}/files/"
    for rel_path, data in SOURCE_FILES.items():
        assert s3.get_object(Bucket=bucket, Key=prefix + rel_path)["Body"].read() == data, rel_path


@pytest.mark.parametrize(("checksum", "header"), [
    ("sha256", "x-amz-checksum-sha256"), ("crc32", "x-amz-checksum-crc32"), ("md5", "Content-MD5"), ("none", None)])
def test_the_crt_signs_the_payload_only_when_the_body_has_no_checksum(
        checksum: str, header: str | None, moto_endpoint: str, bucket: str, tmp_path: Path, journal_path: Path) -> None:
    """As botocore does here (test_large_files): a body with its checksum header goes with an
    unsigned payload; with --checksum none the signature covers the body's SHA-256."""
    data = b"signed or not\n" * 10
    source = write_tree(tmp_path / "src", {"a.txt": data})
    with FaultProxy(moto_endpoint) as proxy:
        heads = _recording(proxy)
        result = Cli(proxy.url, bucket, journal_path)(
            "upload", "--transport", "crt", "--checksum", checksum, str(source))
    assert result.exit_code == 0, result.stderr
    (put,) = [head for head in heads if head.operation == "PutObject" and head.path.endswith("/files/a.txt")]
    payload = put.header("x-amz-content-sha256")
    if header is None:
        assert payload == hashlib.sha256(data).hexdigest()
    else:
        assert payload == "UNSIGNED-PAYLOAD" and put.header(header)


class _RecordingHashlib:
    """archup.store.crt's hashlib, keeping what it makes a SHA-256 of."""

    def __init__(self) -> None:
        self.hashed: list[bytes] = []

    def sha256(self, data: bytes = b"") -> Any:
        self.hashed.append(bytes(data))
        return hashlib.sha256(data)


def test_a_signed_payload_is_signed_with_the_digest_archup_has(moto_endpoint: str, bucket: str, s3: Any,
                                                               tmp_path: Path, journal_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--checksum none: the signature carries the body's SHA-256, which archup computed as it
    read the file; the CRT store does not hash the body a second time for it (on the
    asynchronous PUT of a small file, nor on the waiting put()). The header's value is
    checked by the test above."""
    import archup.store.crt as crt_module

    recording = _RecordingHashlib()
    monkeypatch.setattr(crt_module, "hashlib", recording)
    data = b"signed with archup's digest\n" * 40
    source = write_tree(tmp_path / "src", {"a.txt": data})
    result = Cli(moto_endpoint, bucket, journal_path)("upload", "--json", "--transport", "crt", "--checksum", "none",
                                                      str(source))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["files_uploaded"] == 1
    assert data not in recording.hashed  # (the batch's own small documents come without a digest)
    body = b"waiting put\n"
    put = CrtPut(Endpoint("http", moto_endpoint.split("://")[1], f"/{bucket}/", "us-east-1"),
                 Credentials("testing", "testing", None), retry=RetryPolicy(attempts=1), connect_timeout=2,
                 read_timeout=10, max_connections=2, sign_payload=True)
    assert put.put("k/waiting.txt", body, [], what="PutObject k", body_sha256=hashlib.sha256(body).digest())
    assert s3.get_object(Bucket=bucket, Key="k/waiting.txt")["Body"].read() == body
    assert body not in recording.hashed
    put.put("k/no-digest.txt", body, [], what="PutObject k")  # without the caller's digest: hashed here
    assert recording.hashed.count(body) == 1


def _stored(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    head = s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return {
        "body": s3.get_object(Bucket=bucket, Key=key)["Body"].read(),
        "metadata": head["Metadata"], "content_type": head.get("ContentType"),
        "storage_class": head.get("StorageClass", "STANDARD"), "sse": head.get("ServerSideEncryption"),
        "sha256": head.get("ChecksumSHA256"), "etag": head["ETag"],
        "tags": sorted((tag["Key"], tag["Value"]) for tag in tags),
    }


@pytest.mark.parametrize("checksum", ["sha256", "crc32", "md5", "none"])
def test_an_object_sent_by_the_crt_is_the_object_botocore_stores(checksum: str, cli: Cli, s3: Any, bucket: str,
                                                                 tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"doc.json": b'{"a": 1}\n', "blob.bin": bytes(range(200)) * 50})
    stored: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in TRANSPORTS:
        result = cli("upload", "--json", "--new-batch", "--transport", kind, "--checksum", checksum,
                     "--storage-class", "STANDARD_IA", "--sse", "AES256", "--metadata", "owner=ops",
                     "--tag", "project=alpha", "--tag", "keep=10y", str(source))
        assert result.exit_code == 0, result.stderr
        prefix = f"staging/{json.loads(result.stdout)['batch_id']}/files/"
        stored[kind] = {rel: _stored(s3, bucket, prefix + rel) for rel in ("doc.json", "blob.bin")}
        for rel in stored[kind]:  # the one thing that differs: each run is its own batch
            assert stored[kind][rel]["metadata"].pop("archup-batch") == json.loads(result.stdout)["batch_id"]
    # The stored SHA-256 checksum: the CRT path also names the algorithm
    # (x-amz-sdk-checksum-algorithm), as AWS's SDKs do; moto keeps the checksum only then.
    for rel, data in (("doc.json", b'{"a": 1}\n'), ("blob.bin", bytes(range(200)) * 50)):
        crt_sum, botocore_sum = stored["crt"][rel].pop("sha256"), stored["botocore"][rel].pop("sha256")
        if checksum == "sha256":
            assert crt_sum == base64.b64encode(hashlib.sha256(data).digest()).decode()
            assert botocore_sum in (None, crt_sum)
    assert stored["crt"] == stored["botocore"]
    blob = stored["crt"]["blob.bin"]
    assert blob["metadata"]["owner"] == "ops"
    assert blob["metadata"]["archup-sha256"] == hashlib.sha256(bytes(range(200)) * 50).hexdigest()
    assert (blob["storage_class"], blob["sse"], blob["tags"]) == (
        "STANDARD_IA", "AES256", [("keep", "10y"), ("project", "alpha")])
    assert stored["crt"]["doc.json"]["content_type"] == "application/json"


def test_keys_are_quoted_as_botocore_quotes_them() -> None:
    assert quote_key("a b/ü+%?#~=&.txt") == "a%20b/%C3%BC%2B%25%3F%23~%3D%26.txt"


@pytest.mark.parametrize(("endpoint_url", "region", "host", "path_prefix"), [
    (None, "ap-south-1", "archup-addr.s3.ap-south-1.amazonaws.com", "/"),       # AWS: virtual-hosted
    (None, "us-east-1", "archup-addr.s3.amazonaws.com", "/"),
    ("http://127.0.0.1:9", "eu-west-3", "127.0.0.1:9", "/archup-addr/"),         # an IP: path-style
])
def test_the_crt_sends_a_key_where_botocore_would(endpoint_url: str | None, region: str, host: str,
                                                  path_prefix: str) -> None:
    """Built and signed by botocore, answered before it leaves the process: no request is sent."""
    store = S3Store(StoreConfig(bucket="archup-addr", endpoint_url=endpoint_url, region=region))
    endpoint = Endpoint.from_request(*store.signed_put_url(), "archup-endpoint-probe")
    scheme = "http" if endpoint_url else "https"
    assert endpoint == Endpoint(scheme, host, path_prefix, region)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_credential_chain_is_raised_as_itself(moto_endpoint: str) -> None:
    """The CRT only says its delegate failed; archup raises what the chain raised, and prints
    no traceback from the CRT's thread (an unraisable exception)."""
    def no_credentials() -> Credentials:
        raise DestinationError("PutObject: no usable credentials (the chain found none)")

    put = CrtPut(Endpoint("http", moto_endpoint.split("://")[1], "/archup-none/", "us-east-1"), no_credentials,
                 retry=RetryPolicy(attempts=3), connect_timeout=2, read_timeout=2, max_connections=2,
                 sign_payload=False)
    with pytest.raises(DestinationError, match="the chain found none"):
        put.put("k", b"body", [], what="PutObject k")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_no_credentials_from_botocores_chain_is_a_destination_error(moto_endpoint: str, bucket: str) -> None:
    """Credentials gone after the preflight (an expired role, a removed profile): a source
    file's PUT through the CRT raises DestinationError (exit 5: the run stops, resumable)."""
    store = open_store(StoreConfig(bucket=bucket, endpoint_url=moto_endpoint, transport=TransportKind.CRT))
    assert isinstance(store, CrtPutStore)
    store.s3._credentials = None  # what botocore's chain answers when it finds nothing
    with pytest.raises(DestinationError, match="no usable credentials") as raised:
        store.put_object("staging/x/files/a.txt", b"a\n", archive=True)
    assert raised.value.exit_code == ExitCode.DESTINATION


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_a_glacier_batch_is_sealed_with_its_manifest_readable(kind: str, cli: Cli, s3: Any, bucket: str,
                                                              tmp_path: Path) -> None:
    """--storage-class GLACIER puts the files in the archive class; the batch's own objects
    (marker, manifest) stay readable, so a restore can plan before any thaw."""
    source = write_tree(tmp_path / "src", {"a.txt": b"alpha\n", "dir/b.bin": bytes(range(256))})
    result = cli("upload", "--json", "--transport", kind, "--storage-class", "GLACIER", str(source))
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    prefix = f"staging/{summary['batch_id']}/"
    listed = {item["Key"]: item.get("StorageClass", "STANDARD")
              for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert {key: value for key, value in listed.items() if "/files/" in key} == {
        prefix + "files/a.txt": "GLACIER", prefix + "files/dir/b.bin": "GLACIER"}
    assert summary["manifest_key"] in listed
    assert {value for key, value in listed.items() if "/files/" not in key} == {"STANDARD"}
    assert json.loads(s3.get_object(Bucket=bucket, Key=summary["manifest_key"])["Body"].read())


@pytest.fixture
def delegates(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every callable handed to the CRT as a delegate credentials provider (the CRT calls it,
    on its own thread and holding the GIL, for every request it signs)."""
    from awscrt.auth import AwsCredentialsProvider

    made: list[Any] = []
    original = AwsCredentialsProvider.new_delegate

    def recording(cls: type, get_credentials: Any) -> Any:
        made.append(get_credentials)
        return original(get_credentials)

    monkeypatch.setattr(AwsCredentialsProvider, "new_delegate", classmethod(recording))
    return made


def _put_keys_signed_with(heads: list[RequestHead]) -> list[str]:
    """The access key of each file PutObject's signature, in order."""
    return [(head.header("Authorization") or "").partition("Credential=")[2].split("/")[0]
            for head in heads if head.operation == "PutObject" and "/files/" in head.path]


@pytest.mark.parametrize("source", ["environment", "credentials-file"])
def test_keys_that_cannot_change_are_given_to_the_crt_once(
        source: str, delegates: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        moto_endpoint: str, bucket: str, s3: Any) -> None:
    expected = "testing-access-key"  # conftest's AWS_ACCESS_KEY_ID
    if source == "credentials-file":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        credentials = tmp_path / "credentials"
        credentials.write_text("[default]\naws_access_key_id = from-the-file\naws_secret_access_key = its-secret\n")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
        expected = "from-the-file"
    with FaultProxy(moto_endpoint) as proxy:
        heads = _recording(proxy)
        store = open_store(StoreConfig(bucket=bucket, endpoint_url=proxy.url, transport=TransportKind.CRT))
        assert isinstance(store, CrtPutStore)
        for name in ("a", "b", "c"):
            store.put_object(f"staging/x/files/{name}", name.encode(), archive=True)
    assert delegates == []
    assert _put_keys_signed_with(heads) == [expected] * 3
    assert s3.get_object(Bucket=bucket, Key="staging/x/files/c")["Body"].read() == b"c"


# A credential_process whose every answer is a new key that expires in 12 minutes: inside
# botocore's advisory refresh window (15 minutes) and outside its mandatory one (10), so each
# signature refreshes, without blocking.
_CREDENTIAL_PROCESS = textwrap.dedent("""\
    import datetime, json, pathlib, sys
    counter = pathlib.Path(sys.argv[1])
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)
    print(json.dumps({"Version": 1, "AccessKeyId": f"refreshed-{count}", "SecretAccessKey": f"secret-{count}",
                      "SessionToken": f"token-{count}", "Expiration": expires.isoformat()}))
""")


def test_refreshable_credentials_are_asked_for_at_each_signature(
        delegates: list[Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, moto_endpoint: str, bucket: str,
        s3: Any) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    script = tmp_path / "credential_process.py"
    script.write_text(_CREDENTIAL_PROCESS)
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script} {tmp_path / 'answers'}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with FaultProxy(moto_endpoint) as proxy:
        heads = _recording(proxy)
        store = open_store(StoreConfig(bucket=bucket, endpoint_url=proxy.url, transport=TransportKind.CRT))
        assert isinstance(store, CrtPutStore)
        assert store.s3.fixed_credentials() is None
        store.put_object("staging/x/files/a", b"a", archive=True)
        store.put_object("staging/x/files/b", b"b", archive=True)
    assert len(delegates) == 1
    first, second = _put_keys_signed_with(heads)
    assert first.startswith("refreshed-") and second.startswith("refreshed-")
    # The second request was signed with a key refreshed after the first's.
    assert int(second.removeprefix("refreshed-")) > int(first.removeprefix("refreshed-"))
    assert s3.get_object(Bucket=bucket, Key="staging/x/files/b")["Body"].read() == b"b"

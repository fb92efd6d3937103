"""What an S3 error answer means, whichever client received it (botocore or the CRT's).

One table for both transports: the codes after which no request to the destination can
succeed (DestinationError, exit 5), the hint printed with each, and the codes that say
a body arrived changed on the way (archup sends it again).
"""

from __future__ import annotations

from ..errors import DestinationError, TransferError

# Answers that mean no further request to this destination can succeed.
FATAL_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "NoSuchBucket", "InvalidBucketName",
    # A bare 403 (no body, as on HEAD) is access denied; a bare 404 is not fatal: it is
    # how some servers answer one odd key, while a missing bucket says NoSuchBucket.
    "AccountProblem", "RequestTimeTooSkewed", "403",
})
HINTS = {
    "RequestTimeTooSkewed": "this machine's clock differs too much from the server's; fix the clock (NTP)",
    "ExpiredToken": "the session token has expired; refresh the credentials and resume the batch",
    "NoSuchBucket": "create the bucket or fix --bucket",
    "InvalidAccessKeyId": "check the credentials (profile, AWS_ACCESS_KEY_ID)",
    "SignatureDoesNotMatch": "check the secret key of the credentials",
    "AccessDenied": "the credentials may not write to this bucket and prefix",
}

# The server received a body other than the one sent (its checksum does not match): the
# bytes were changed on the way. botocore does not retry a 400; archup sends the body again.
CORRUPTED = ("BadDigest", "XAmzContentSHA256Mismatch")


def answer_error(what: str, code: str, message: str) -> DestinationError | TransferError:
    """The named error for an S3 error answer: DestinationError (fatal) or TransferError."""
    hint = HINTS.get(code)
    text = f"{what}: {code}: {message or code}" + (f"; {hint}" if hint else "")
    if code in FATAL_CODES:
        return DestinationError(text, code)
    return TransferError(text, code)

"""Who vouches for a model artifact: its signature, checked against a key from the worker's own
configuration, never one stored beside the artifact.

``manifest.json`` lists the sha256 of every other file of the artifact, and every file the worker
downloads or loads is checked against it; so signing the exact bytes of ``manifest.json`` signs the
whole artifact. A signed artifact carries ``manifest.sig`` beside its manifest, a JSON envelope::

    {"payload_type": "application/vnd.dogbreeds.artifact-statement+json",
     "payload": "<base64: the statement>",
     "algorithm": "ed25519" | "ecdsa-p256-sha256",
     "key_id": "sha256:<first 32 hex digits of the sha256 of the public key (DER SubjectPublicKeyInfo)>",
     "signature": "<base64: the signature of the payload bytes>",
     "kms_key_arn": "<the AWS KMS key that signed, when one did>"}

and the statement (canonical JSON, the signed bytes) names the manifest by its digest::

    {"_type": "dogbreeds/artifact-statement/v1", "manifest": {"name": "manifest.json", "sha256": "<hex>"},
     "model": {"name": "<name>", "version": "<version>"}}

(The payload is small, so an AWS KMS key signs it as a RAW message: KMS takes at most 4 KiB.)

The worker's :class:`TrustPolicy` comes from its own settings: ``DOGBREEDS_TRUSTED_KEY`` (a PEM
public key, inline or a file, or ``kms://<key id, alias/name or ARN>`` whose public key is fetched
with ``kms:GetPublicKey``) and ``DOGBREEDS_MODEL_DIGEST`` (the sha256 of the ``manifest.json`` to
serve). :meth:`TrustPolicy.check` runs on the manifest bytes before anything of the artifact is
parsed, downloaded or loaded, and refuses with a :class:`SignatureError` whose ``reason`` is one of
``digest_mismatch``, ``unsigned``, ``malformed``, ``other_key``, ``bad_signature``, ``modified``.
Without a trusted key the artifact is served unverified (``Provenance.verified`` False: the worker
logs a warning).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from worker.artifact.contract import MANIFEST_FILE, SIGNATURE_FILE, ArtifactError

__all__ = [
    "ALGORITHMS",
    "DIGEST_ENV",
    "KMS_SCHEME",
    "PAYLOAD_TYPE",
    "STATEMENT_TYPE",
    "TRUSTED_KEY_ENV",
    "Provenance",
    "SignatureError",
    "TrustPolicy",
    "TrustedKey",
    "envelope_bytes",
    "key_id",
    "load_public_key",
    "statement_bytes",
]

TRUSTED_KEY_ENV = "DOGBREEDS_TRUSTED_KEY"
DIGEST_ENV = "DOGBREEDS_MODEL_DIGEST"
KMS_SCHEME = "kms://"
PAYLOAD_TYPE = "application/vnd.dogbreeds.artifact-statement+json"
STATEMENT_TYPE = "dogbreeds/artifact-statement/v1"
ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256-sha256"
ALGORITHMS = (ED25519, ECDSA_P256)
KMS_KEY_SPEC = "ECC_NIST_P256"  # the AWS KMS key spec that signs ECDSA_SHA_256 (= ECDSA_P256 here)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----(.*?)-----END \1-----", re.S)


class SignatureError(ArtifactError):
    """The artifact is not vouched for by the trusted key (or is not the pinned manifest).

    ``reason``: ``digest_mismatch`` | ``unsigned`` | ``malformed`` | ``other_key`` |
    ``bad_signature`` | ``modified``."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{message} [{reason}]")
        self.reason = reason


# --------------------------------------------------------------------------- the signed format


def manifest_sha256(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def statement_bytes(manifest_bytes: bytes) -> bytes:
    """The signed payload for a manifest: its digest (and, for people reading it, the model's
    name and version)."""
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as error:
        raise ArtifactError(f"{MANIFEST_FILE} is not valid JSON: {error}") from None
    model = {k: manifest.get(k) for k in ("name", "version")} if isinstance(manifest, dict) else {}
    return _canonical({"_type": STATEMENT_TYPE, "manifest": {"name": MANIFEST_FILE,
                                                             "sha256": manifest_sha256(manifest_bytes)},
                       "model": model})


def envelope_bytes(payload: bytes, *, algorithm: str, key_id: str, signature: bytes,
                   kms_key_arn: str | None = None) -> bytes:
    """The ``manifest.sig`` document."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown signature algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    document = {"payload_type": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode("ascii"),
                "algorithm": algorithm, "key_id": key_id, "signature": base64.b64encode(signature).decode("ascii")}
    if kms_key_arn:
        document["kms_key_arn"] = kms_key_arn
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class _Envelope:
    payload: bytes
    algorithm: str
    key_id: str
    signature: bytes
    kms_key_arn: str | None


def _parse_envelope(data: bytes, where: str) -> _Envelope:
    def bad(why: str) -> SignatureError:
        return SignatureError("malformed", f"{where}/{SIGNATURE_FILE}: not a dogbreeds signature ({why})")

    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(document, dict):
        raise bad("not a JSON object")
    if document.get("payload_type") != PAYLOAD_TYPE:
        raise bad(f"payload_type is {str(document.get('payload_type'))[:80]!r}")
    if document.get("algorithm") not in ALGORITHMS:
        raise bad(f"algorithm {str(document.get('algorithm'))[:40]!r} is not one of {', '.join(ALGORITHMS)}")
    fields = {}
    for name in ("payload", "signature"):
        value = document.get(name)
        try:
            fields[name] = base64.b64decode(value, validate=True) if isinstance(value, str) else None
        except (binascii.Error, ValueError):
            fields[name] = None
        if not fields[name]:
            raise bad(f"{name} is not base64")
    key = document.get("key_id")
    arn = document.get("kms_key_arn")
    return _Envelope(fields["payload"], document["algorithm"], key if isinstance(key, str) else "?",
                     fields["signature"], arn if isinstance(arn, str) else None)


# --------------------------------------------------------------------------- keys


def key_id(public_key) -> str:
    """``sha256:<32 hex digits>`` of a public key's DER SubjectPublicKeyInfo: the same for a PEM
    file and for the KMS key it was exported from."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()[:32]


def algorithm_of(public_key) -> str:
    """The envelope algorithm a key signs with (Ed25519 or ECDSA P-256); others are refused."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1":
        return ECDSA_P256
    raise ValueError(f"unsupported key type {type(public_key).__name__}: use an Ed25519 or ECDSA P-256 key")


def _normalise_pem(text: str) -> bytes:
    """A PEM block, also when its line breaks were flattened to spaces (an environment variable or
    a CloudFormation parameter holding it on one line)."""
    match = _PEM.search(text)
    if not match:
        raise ValueError("no PEM block")
    label, body = match.group(1), "".join(match.group(2).split())
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"]) + "\n").encode("ascii")


def load_public_key(data: bytes | str):
    """A PEM (or DER) public key; Ed25519 or ECDSA P-256."""
    from cryptography.hazmat.primitives import serialization

    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(_normalise_pem(data.decode("ascii", "replace")))
        else:
            key = serialization.load_der_public_key(data)
    except ValueError as error:
        raise ValueError(f"not a public key ({error})") from None
    algorithm_of(key)
    return key


@dataclass(frozen=True)
class TrustedKey:
    """The public key the worker trusts, with where it came from (for messages and logs)."""

    public_key: Any
    source: str  # "file /path/signing.pub", "inline PEM", "kms://alias/dogbreeds-signing"
    kms_key_arn: str | None = None

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.public_key)

    @classmethod
    def parse(cls, value: str, *, kms=None) -> "TrustedKey":
        """``kms://<key id | alias/name | ARN>``, an inline PEM public key, or a PEM/DER file path.
        Raises ArtifactError with a one-line reason."""
        value = value.strip()
        if value.startswith(KMS_SCHEME):
            return cls.from_kms(value[len(KMS_SCHEME):], kms=kms)
        if "-----BEGIN" in value:
            try:
                return cls(load_public_key(value), "inline PEM")
            except ValueError as error:
                raise ArtifactError(f"trusted key (inline PEM): {error}") from None
        path = Path(value).expanduser()
        try:
            return cls(load_public_key(path.read_bytes()), f"file {path}")
        except OSError as error:
            raise ArtifactError(f"trusted key file {path}: {error.strerror or error}") from None
        except ValueError as error:
            raise ArtifactError(f"trusted key file {path}: {error}") from None

    @classmethod
    def from_kms(cls, key: str, *, kms=None) -> "TrustedKey":
        """The public half of an AWS KMS asymmetric signing key (``kms:GetPublicKey``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        if not key:
            raise ArtifactError("trusted key kms://: no key id given (kms://<key id, alias/name or ARN>)")
        if kms is None:
            from worker.settings import client

            kms = client("kms")
        try:
            answer = kms.get_public_key(KeyId=key)
        except (ClientError, BotoCoreError) as error:
            raise ArtifactError(f"trusted key kms://{key}: {error}") from None
        spec = answer.get("KeySpec") or answer.get("CustomerMasterKeySpec")
        if answer.get("KeyUsage") != "SIGN_VERIFY" or spec != KMS_KEY_SPEC:
            raise ArtifactError(f"trusted key kms://{key}: a {spec} {answer.get('KeyUsage')} key; dogbreeds "
                                f"signs with {KMS_KEY_SPEC} SIGN_VERIFY keys (ECDSA_SHA_256)")
        try:
            public_key = load_public_key(answer["PublicKey"])
        except ValueError as error:
            raise ArtifactError(f"trusted key kms://{key}: {error}") from None
        return cls(public_key, f"kms://{key}", kms_key_arn=answer.get("KeyId"))

    def verifies(self, algorithm: str, payload: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        if algorithm != self.algorithm:
            return False
        try:
            if algorithm == ED25519:
                self.public_key.verify(signature, payload)
            else:
                self.public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class Provenance:
    """What the worker knows about the artifact it serves."""

    manifest_sha256: str
    verified: bool  # its signature verified with the trusted key
    key_id: str | None = None  # of the trusted key that verified it
    key_source: str | None = None
    digest_pinned: bool = False  # manifest.json matched the configured digest

    def to_dict(self) -> dict[str, Any]:
        return {"manifest_sha256": self.manifest_sha256,
                "signature": "verified" if self.verified else "unverified",
                "key_id": self.key_id, "trusted_key": self.key_source, "digest_pinned": self.digest_pinned}


def _parse_digest(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    digest = value.strip().lower()
    digest = digest[len("sha256:"):] if digest.startswith("sha256:") else digest
    if not _HEX64.match(digest):
        raise ArtifactError(f"model digest {value!r} is not a sha256 (64 hex digits, optionally 'sha256:' first)")
    return digest


@dataclass(frozen=True)
class TrustPolicy:
    """The worker's own idea of which artifacts it may serve: signed by ``key`` (when one is
    configured) and, optionally, exactly the manifest whose sha256 is ``manifest_sha256``."""

    key: TrustedKey | None = None
    manifest_sha256: str | None = None

    @property
    def requires_signature(self) -> bool:
        return self.key is not None

    @classmethod
    def from_config(cls, trusted_key: str | None = None, model_digest: str | None = None, *, kms=None) -> "TrustPolicy":
        key = TrustedKey.parse(trusted_key, kms=kms) if trusted_key and trusted_key.strip() else None
        return cls(key, _parse_digest(model_digest))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, *, kms=None) -> "TrustPolicy":
        return cls.from_config(env.get(TRUSTED_KEY_ENV), env.get(DIGEST_ENV), kms=kms)

    def check(self, manifest_bytes: bytes, signature: bytes | None, where: str) -> Provenance:
        """Vouch for ``manifest_bytes`` (before they are parsed) or raise :class:`SignatureError`."""
        digest = manifest_sha256(manifest_bytes)
        if self.manifest_sha256 is not None and digest != self.manifest_sha256:
            raise SignatureError("digest_mismatch", f"{where}: {MANIFEST_FILE} has sha256 {digest}, not the pinned "
                                                    f"model digest {self.manifest_sha256} ({DIGEST_ENV})")
        if self.key is None:
            return Provenance(digest, verified=False, digest_pinned=self.manifest_sha256 is not None)
        trusted = self.key
        if signature is None:
            raise SignatureError("unsigned", f"{where}: the artifact is unsigned (no {SIGNATURE_FILE}) and the worker "
                                             f"trusts only artifacts signed by {trusted.key_id} ({trusted.source})")
        envelope = _parse_envelope(signature, where)
        if not trusted.verifies(envelope.algorithm, envelope.payload, envelope.signature):
            if envelope.key_id != trusted.key_id:
                raise SignatureError("other_key", f"{where}: signed by another key ({envelope.key_id}, "
                                                  f"{envelope.algorithm}), not by the trusted key {trusted.key_id} "
                                                  f"({trusted.source})")
            raise SignatureError("bad_signature", f"{where}: the signature does not verify with the trusted key "
                                                  f"{trusted.key_id} (forged or corrupted {SIGNATURE_FILE})")
        try:
            statement = json.loads(envelope.payload)
            signed = statement["manifest"]["sha256"] if statement.get("_type") == STATEMENT_TYPE else None
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            signed = None
        if not isinstance(signed, str):
            raise SignatureError("malformed", f"{where}/{SIGNATURE_FILE}: the signed statement names no manifest")
        if signed != digest:
            raise SignatureError("modified", f"{where}: {MANIFEST_FILE} was modified after it was signed "
                                             f"(sha256 {digest}, signed {signed})")
        return Provenance(digest, verified=True, key_id=trusted.key_id, key_source=trusted.source,
                          digest_pinned=self.manifest_sha256 is not None)

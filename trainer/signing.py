"""Sign a model artifact: the signature of its ``manifest.json`` (which lists the sha256 of every
other file), written beside it as ``manifest.sig`` (the format is :mod:`worker.signature`'s).

Two kinds of signing key:

- a PEM private key file, Ed25519 (``dogbreeds-train keygen`` makes a pair) or ECDSA P-256;
- ``kms://<key id, alias/name or ARN>``: an AWS KMS asymmetric key (``ECC_NIST_P256``,
  ``SIGN_VERIFY``) that signs with ``kms:Sign`` (ECDSA_SHA_256) and never leaves KMS; the
  publisher also needs ``kms:GetPublicKey`` (to name the key in the signature).

The private key never goes into the artifact; the worker verifies against a public key (or KMS
key) from its own configuration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from worker import signature
from worker.artifact.contract import MANIFEST_FILE, SIGNATURE_FILE, ArtifactError

__all__ = ["FileSigner", "KmsSigner", "Signer", "generate_key_pair", "sign_artifact", "signer_from"]


class Signer(Protocol):
    algorithm: str  # worker.signature.ALGORITHMS
    key_id: str  # worker.signature.key_id of its public key
    kms_key_arn: str | None

    def sign(self, payload: bytes) -> bytes: ...


@dataclass(frozen=True)
class FileSigner:
    """A PEM private key (PKCS#8 or OpenSSL), Ed25519 or ECDSA P-256, unencrypted or with its
    password in ``$DOGBREEDS_SIGN_KEY_PASSWORD``."""

    private_key: object
    algorithm: str
    key_id: str
    kms_key_arn: str | None = None

    @classmethod
    def from_file(cls, path: Path) -> "FileSigner":
        from cryptography.hazmat.primitives import serialization

        path = Path(path).expanduser()
        password = os.environ.get("DOGBREEDS_SIGN_KEY_PASSWORD")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(),
                                                     password=password.encode() if password else None)
        except OSError as error:
            raise ArtifactError(f"signing key {path}: {error.strerror or error}") from None
        except (ValueError, TypeError) as error:
            raise ArtifactError(f"signing key {path}: not a usable PEM private key ({error})") from None
        try:
            algorithm = signature.algorithm_of(key.public_key())
        except ValueError as error:
            raise ArtifactError(f"signing key {path}: {error}") from None
        return cls(key, algorithm, signature.key_id(key.public_key()))

    def sign(self, payload: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        if self.algorithm == signature.ED25519:
            return self.private_key.sign(payload)
        return self.private_key.sign(payload, ec.ECDSA(hashes.SHA256()))


@dataclass(frozen=True)
class KmsSigner:
    """An AWS KMS ECC_NIST_P256 signing key: ``kms:Sign`` with ECDSA_SHA_256 on the RAW payload
    (the statement is far below KMS's 4 KiB message limit)."""

    kms: object
    key: str  # as given: key id, alias/name or ARN
    key_id: str
    kms_key_arn: str
    algorithm: str = signature.ECDSA_P256

    @classmethod
    def connect(cls, key: str, *, kms=None) -> "KmsSigner":
        if kms is None:
            import boto3

            kms = boto3.client("kms")
        trusted = signature.TrustedKey.from_kms(key, kms=kms)  # checks the key spec and usage
        return cls(kms, key, trusted.key_id, trusted.kms_key_arn or key)

    def sign(self, payload: bytes) -> bytes:
        answer = self.kms.sign(KeyId=self.key, Message=payload, MessageType="RAW", SigningAlgorithm="ECDSA_SHA_256")
        return answer["Signature"]


def signer_from(spec: str, *, kms=None) -> Signer:
    """``kms://<key>`` or a PEM private key file."""
    if spec.startswith(signature.KMS_SCHEME):
        return KmsSigner.connect(spec[len(signature.KMS_SCHEME):], kms=kms)
    return FileSigner.from_file(Path(spec))


def sign_artifact(artifact_dir: Path, signer: Signer) -> bytes:
    """Sign the artifact in ``artifact_dir`` (its manifest.json as it is on disk) and write
    ``manifest.sig`` beside it. Returns the signature document."""
    artifact_dir = Path(artifact_dir)
    manifest_bytes = (artifact_dir / MANIFEST_FILE).read_bytes()
    payload = signature.statement_bytes(manifest_bytes)
    document = signature.envelope_bytes(payload, algorithm=signer.algorithm, key_id=signer.key_id,
                                        signature=signer.sign(payload), kms_key_arn=signer.kms_key_arn)
    target = artifact_dir / SIGNATURE_FILE
    partial = target.with_name(f".{target.name}.partial")
    partial.write_bytes(document)
    os.replace(partial, target)
    return document


def generate_key_pair(prefix: Path, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """An Ed25519 key pair: ``<prefix>.key`` (PKCS#8 PEM, readable by its owner only) and
    ``<prefix>.pub`` (the public key, for the worker). Returns (private, public, key id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    prefix = Path(prefix)
    private_path, public_path = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists (keep it, or overwrite it on purpose)")
    private_path.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.unlink(missing_ok=True)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, signature.key_id(key.public_key())

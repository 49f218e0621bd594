"""Signed artifacts: trainer.signing signs manifest.json, worker.signature checks the signature
against the worker's own trusted key (a PEM file or an AWS KMS key on moto) before anything of the
artifact is downloaded or loaded.

The attacks: someone who can write the artifact's files (models/ in S3) but does not hold the
signing key (a) changes a weights file and rewrites manifest.json with matching sums, (b) re-signs
the artifact with a key of their own, (c) swaps in a SavedModel whose graph reads the process's
environment (/proc/self/environ: the Lambda's AWS credentials) and writes it out. Each is refused
with the trusted key configured, through load_artifact, the worker CLI and S3; each control run
(verification off) shows the attack would otherwise have been served."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import boto3
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import COLOUR_BREEDS, colour_photo
from trainer.registry import upload_artifact
from trainer.signing import FileSigner, KmsSigner, generate_key_pair, sign_artifact, signer_from
from worker import runtimes
from worker.artifact import ArtifactError, sha256_file
from worker.artifact.loading import load_artifact
from worker.signature import (
    SignatureError,
    TrustedKey,
    TrustPolicy,
    envelope_bytes,
    key_id,
    load_public_key,
    statement_bytes,
)

MANIFEST = json.dumps({"name": "colours", "version": "v1", "files": {"labels.json": "0" * 64}}, indent=2).encode()
BUCKET = "signed-models"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """The publisher's Ed25519 pair, an attacker's pair, and an ECDSA P-256 pair (PEM files)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("keys")
    trusted_key, trusted_pub, _ = generate_key_pair(root / "trusted")
    attacker_key, attacker_pub, _ = generate_key_pair(root / "attacker")
    ecdsa = ec.generate_private_key(ec.SECP256R1())
    (root / "ecdsa.key").write_bytes(ecdsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (root / "ecdsa.pub").write_bytes(ecdsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return {"key": trusted_key, "pub": trusted_pub, "attacker_key": attacker_key, "attacker_pub": attacker_pub,
            "ecdsa_key": root / "ecdsa.key", "ecdsa_pub": root / "ecdsa.pub"}


def signature_of(manifest: bytes, key_file: Path) -> bytes:
    signer = FileSigner.from_file(key_file)
    payload = statement_bytes(manifest)
    return envelope_bytes(payload, algorithm=signer.algorithm, key_id=signer.key_id, signature=signer.sign(payload))


def trusting(pub: Path, **kw) -> TrustPolicy:
    return TrustPolicy.from_config(str(pub), **kw)


# --------------------------------------------------------------------------- the policy on manifest bytes


@pytest.mark.parametrize("pair", [("key", "pub"), ("ecdsa_key", "ecdsa_pub")], ids=["ed25519", "ecdsa-p256"])
def test_a_signature_by_the_trusted_key_verifies(keys, pair):
    signature = signature_of(MANIFEST, keys[pair[0]])
    provenance = trusting(keys[pair[1]]).check(MANIFEST, signature, "here")
    assert provenance.verified and provenance.key_id == key_id(load_public_key(keys[pair[1]].read_bytes()))
    assert provenance.manifest_sha256 == hashlib.sha256(MANIFEST).hexdigest()
    envelope = json.loads(signature)
    assert envelope["key_id"] == provenance.key_id and "PRIVATE" not in signature.decode()
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["manifest"]["sha256"] == provenance.manifest_sha256
    assert statement["model"] == {"name": "colours", "version": "v1"}


def test_each_refusal_names_its_reason(keys):
    policy = trusting(keys["pub"])
    good = signature_of(MANIFEST, keys["key"])

    def reason(manifest: bytes, signature: bytes | None, check=policy) -> str:
        with pytest.raises(SignatureError) as refused:
            check.check(manifest, signature, "s3://b/models/colours/v1")
        assert "\n" not in str(refused.value) and f"[{refused.value.reason}]" in str(refused.value)
        assert isinstance(refused.value, ArtifactError)  # the CLI's one-line refusal
        return refused.value.reason

    assert reason(MANIFEST, None) == "unsigned"
    assert reason(MANIFEST.replace(b'"v1"', b'"v2"'), good) == "modified"
    assert reason(MANIFEST, signature_of(MANIFEST, keys["attacker_key"])) == "other_key"
    assert reason(MANIFEST, signature_of(MANIFEST, keys["ecdsa_key"])) == "other_key"
    forged = json.loads(good)
    forged["signature"] = base64.b64encode(b"\0" * 64).decode()
    assert reason(MANIFEST, json.dumps(forged).encode()) == "bad_signature"
    assert reason(MANIFEST, b"not json") == "malformed"
    assert reason(MANIFEST, b'{"payload_type": "something/else"}') == "malformed"
    digest = hashlib.sha256(MANIFEST).hexdigest()
    pinned = TrustPolicy.from_config(None, "sha256:" + "0" * 64)
    assert reason(MANIFEST, None, pinned) == "digest_mismatch"
    assert TrustPolicy.from_config(None, digest.upper()).check(MANIFEST, None, "x").digest_pinned
    both = trusting(keys["pub"], model_digest=digest)
    assert both.check(MANIFEST, good, "x").verified
    with pytest.raises(ArtifactError, match="not a sha256"):
        TrustPolicy.from_config(None, "latest")


def test_without_a_trusted_key_nothing_is_verified(keys):
    provenance = TrustPolicy().check(MANIFEST, None, "x")
    assert not provenance.verified and provenance.to_dict()["signature"] == "unverified"
    assert TrustPolicy.from_env({}).key is None
    assert TrustPolicy.from_env({"DOGBREEDS_TRUSTED_KEY": str(keys["pub"])}).key is not None


def test_trusted_key_configuration(keys):
    pem = keys["pub"].read_text()
    expected = TrustedKey.parse(str(keys["pub"])).key_id
    assert TrustedKey.parse(pem).key_id == expected  # inline PEM
    assert TrustedKey.parse(" ".join(pem.split("\n"))).key_id == expected  # flattened on one line
    with pytest.raises(ArtifactError, match="No such file"):
        TrustedKey.parse("/nonexistent/signing.pub")
    with pytest.raises(ArtifactError, match="not a public key"):
        TrustedKey.parse(str(keys["key"]))  # the private key is not what a worker is given
    with pytest.raises(ArtifactError, match="not a usable PEM private key"):
        FileSigner.from_file(keys["pub"])
    with pytest.raises(FileExistsError):
        generate_key_pair(keys["key"].with_suffix(""))
    assert keys["key"].stat().st_mode & 0o077 == 0  # the private key is readable by its owner only


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_change_to_the_manifest_or_its_signature_is_refused(keys, data):
    """Property: a changed manifest.json is always refused; a changed manifest.sig is refused
    unless it still carries exactly the same algorithm, payload and signature (JSON spacing)."""
    policy = trusting(keys["pub"])
    signature = signature_of(MANIFEST, keys["key"])
    target = data.draw(st.sampled_from(["manifest", "signature"]))
    original = MANIFEST if target == "manifest" else signature
    kind = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    at = data.draw(st.integers(0, len(original) - 1))
    if kind == "flip":
        changed = original[:at] + bytes([original[at] ^ data.draw(st.integers(1, 255))]) + original[at + 1:]
    elif kind == "insert":
        changed = original[:at] + data.draw(st.binary(min_size=1, max_size=8)) + original[at:]
    elif kind == "delete":
        changed = original[:at] + original[at + data.draw(st.integers(1, 8)):]
    else:
        changed = original[:at]
    manifest, sig = (changed, signature) if target == "manifest" else (MANIFEST, changed)
    try:
        provenance = policy.check(manifest, sig, "x")
    except SignatureError:
        return
    assert target == "signature" and manifest == MANIFEST and provenance.verified
    parsed, before = json.loads(sig), json.loads(signature)
    assert {k: parsed[k] for k in ("algorithm", "payload", "signature")} == \
           {k: before[k] for k in ("algorithm", "payload", "signature")}


# --------------------------------------------------------------------------- AWS KMS (moto)


@pytest.fixture
def kms(aws_env):
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("kms", region_name="us-east-1")
        key = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        client.create_alias(AliasName="alias/dogbreeds-signing", TargetKeyId=key["KeyId"])
        yield client, key


def test_a_kms_key_signs_and_the_worker_verifies_with_kms_or_its_exported_public_key(kms, keys, tmp_path):
    client, key = kms
    signer = signer_from("kms://alias/dogbreeds-signing", kms=client)
    assert isinstance(signer, KmsSigner) and signer.algorithm == "ecdsa-p256-sha256"
    calls = []
    client.meta.events.register("provide-client-params.kms.Sign", lambda params, **_: calls.append(params))
    (tmp_path / "manifest.json").write_bytes(MANIFEST)
    document = json.loads(sign_artifact(tmp_path, signer))
    assert calls and calls[0]["MessageType"] == "RAW" and calls[0]["SigningAlgorithm"] == "ECDSA_SHA_256"
    assert len(calls[0]["Message"]) < 4096  # KMS's limit for a RAW message
    assert document["kms_key_arn"] and document["key_id"] == signer.key_id
    signature = (tmp_path / "manifest.sig").read_bytes()

    by_kms = TrustPolicy.from_config(f"kms://{key['Arn']}", kms=client)
    assert by_kms.check(MANIFEST, signature, "x").verified
    exported = tmp_path / "kms.pub"  # aws kms get-public-key ... | openssl: the same key, offline
    der = client.get_public_key(KeyId=key["KeyId"])["PublicKey"]
    from cryptography.hazmat.primitives import serialization

    exported.write_bytes(load_public_key(der).public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    assert trusting(exported).check(MANIFEST, signature, "x").key_id == signer.key_id

    other = client.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    with pytest.raises(SignatureError) as refused:
        TrustPolicy.from_config(f"kms://{other['KeyId']}", kms=client).check(MANIFEST, signature, "x")
    assert refused.value.reason == "other_key"
    with pytest.raises(SignatureError, match="other_key"):
        trusting(keys["pub"]).check(MANIFEST, signature, "x")
    symmetric = client.create_key()["KeyMetadata"]
    with pytest.raises(ArtifactError, match="ECC_NIST_P256 SIGN_VERIFY"):
        TrustPolicy.from_config(f"kms://{symmetric['KeyId']}", kms=client)
    with pytest.raises(ArtifactError, match="kms://alias/missing"):
        TrustPolicy.from_config("kms://alias/missing", kms=client)


# --------------------------------------------------------------------------- attacks on a real artifact


def rewrite_sums(path: Path) -> None:
    """What an attacker who can write the files does: manifest.json lists the new files' sums."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
                         if p.is_file() and p.name not in ("manifest.json", "manifest.sig")}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def evil_savedmodel(tmp_path_factory) -> tuple[Path, Path]:
    """A SavedModel that passes every check of the tf runtime (a ``serve`` signature, one float32
    (n, 32, 32, 3) input, one output of 3 probabilities) and whose graph, when it runs, reads the
    process's environment (/proc/self/environ) and writes it to a file (a real exfiltration path
    would be an s3:// or http(s) file system). Returns (model dir, where it leaks to)."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("evil")
    leak = root / "leaked-environment"

    class Exfiltrate(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32, name="inputs")])
        def serve(self, x):
            tf.io.write_file(str(leak), tf.io.read_file("/proc/self/environ"))
            return {"output_0": tf.one_hot(tf.fill([tf.shape(x)[0]], 2), 3)}  # always the third breed

    module = Exfiltrate()
    tf.saved_model.save(module, str(root / "model"), signatures={"serve": module.serve})
    return root / "model", leak


def tamper_weights(path: Path, keys, evil) -> str:
    weights = path / "model-openvino-int8" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    rewrite_sums(path)
    return "modified"  # the old manifest.sig names the old manifest


def resign(path: Path, keys, evil) -> str:
    tamper_weights(path, keys, evil)
    sign_artifact(path, FileSigner.from_file(keys["attacker_key"]))
    return "other_key"


def swap_savedmodel(path: Path, keys, evil) -> str:
    shutil.rmtree(path / "model")
    shutil.copytree(evil[0], path / "model")
    rewrite_sums(path)
    return "modified"


ATTACKS = {"weights-and-sums": tamper_weights, "re-signed": resign, "evil-savedmodel": swap_savedmodel}


@pytest.fixture
def signed(fast_colour_artifact, keys, tmp_path) -> Path:
    path = shutil.copytree(fast_colour_artifact, tmp_path / "colours-fast")
    sign_artifact(path, FileSigner.from_file(keys["key"]))
    return path


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """Every model the worker loads (runtimes.load): none may be loaded from a refused artifact."""
    calls = []
    original = runtimes.load

    def spy(path, entry, **kw):
        calls.append((Path(path), entry.key))
        return original(path, entry, **kw)

    monkeypatch.setattr(runtimes, "load", spy)
    return calls


def test_the_signed_artifact_is_served_with_the_trusted_key(signed, keys, model_loads):
    loaded = load_artifact(str(signed), trust=trusting(keys["pub"]))
    assert loaded.provenance.verified and loaded.runtime == "openvino-int8"
    assert loaded.provenance.key_id == TrustedKey.parse(str(keys["pub"])).key_id
    assert model_loads == [(signed, "openvino-int8")]


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_attack_on_the_artifact_is_refused_before_anything_is_loaded(attack, signed, keys, evil_savedmodel,
                                                                       model_loads, tmp_path):
    leak = evil_savedmodel[1]
    leak.unlink(missing_ok=True)
    reason = ATTACKS[attack](signed, keys, evil_savedmodel)
    runtime = "tf" if attack == "evil-savedmodel" else None  # even an operator who opted in to the SavedModel

    with pytest.raises(SignatureError) as refused:
        load_artifact(str(signed), trust=trusting(keys["pub"]), runtime=runtime)
    assert refused.value.reason == reason
    assert model_loads == [] and not leak.exists()

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(colour_photo(COLOUR_BREEDS["n02111889-Samoyed"], seed=3))
    from worker.cli import main

    args = ["predict", "--model", str(signed), "--trusted-key", str(keys["pub"]), str(photo)]
    result = CliRunner().invoke(main, args + (["--runtime", runtime] if runtime else []))
    assert result.exit_code == 1 and model_loads == [] and not leak.exists()
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert f"refusing to serve {signed}: SignatureError:" in line and f"[{reason}]" in line

    # control, verification off: the attacker's artifact is served (and the evil graph leaks the environment)
    served = load_artifact(str(signed), trust=TrustPolicy(), runtime=runtime)
    assert not served.provenance.verified and model_loads == [(signed, served.runtime)]
    if attack == "evil-savedmodel":
        served.predict(np.zeros((1, 32, 32, 3), np.float32))
        assert b"PATH=" in leak.read_bytes()


def test_data_only_serving_never_runs_a_swapped_savedmodel_even_unverified(signed, keys, evil_savedmodel,
                                                                           model_loads, monkeypatch):
    """Without a trusted key and without opting in to the SavedModel, the worker serves the
    OpenVINO IR: a swapped-in SavedModel is never loaded or run, not even when the attacker also
    rewrites the manifest so that the SavedModel is all it lists (or its variants failed)."""
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    leak = evil_savedmodel[1]
    leak.unlink(missing_ok=True)
    swap_savedmodel(signed, keys, evil_savedmodel)
    served = load_artifact(str(signed), trust=TrustPolicy())
    served.predict(np.zeros((2, 32, 32, 3), np.float32))
    assert served.runtime == "openvino-int8" and model_loads == [(signed, "openvino-int8")] and not leak.exists()
    model_loads.clear()

    for strip in ("only-the-savedmodel", "variants-failed"):
        manifest = json.loads((signed / "manifest.json").read_text())
        if strip == "only-the-savedmodel":
            manifest["runtimes"] = {"tf": manifest["runtimes"]["tf"]}
        else:
            for key, entry in manifest["runtimes"].items():
                if key != "tf":
                    entry["agreement"]["passed"] = False
        (signed / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        with pytest.raises(runtimes.RuntimeSelectionError, match="DOGBREEDS_ALLOW_SAVEDMODEL"):
            load_artifact(str(signed), trust=TrustPolicy())
        assert model_loads == [] and not leak.exists()


@pytest.fixture
def s3(aws_env, monkeypatch):
    from moto import mock_aws

    monkeypatch.delenv("DOGBREEDS_CACHE", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_attack_written_to_s3_is_refused_before_any_file_is_downloaded(attack, signed, keys, evil_savedmodel,
                                                                          s3, model_loads, tmp_path):
    uri = upload_artifact(signed, f"s3://{BUCKET}/models", s3=s3)
    cache = tmp_path / "cache"
    assert load_artifact(uri, s3=s3, cache_dir=cache, trust=trusting(keys["pub"])).provenance.verified
    model_loads.clear()

    attacked = shutil.copytree(signed, tmp_path / "attacked")
    reason = ATTACKS[attack](attacked, keys, evil_savedmodel)
    prefix = uri.split(f"s3://{BUCKET}/", 1)[1]
    for path in sorted(attacked.rglob("*")):  # the attacker overwrites objects under models/ directly
        if path.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(attacked).as_posix()}",
                          Body=path.read_bytes())
    gets = []
    s3.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"]))
    fresh = tmp_path / "fresh-cache"
    runtime = "tf" if attack == "evil-savedmodel" else None
    with pytest.raises(SignatureError) as refused:
        load_artifact(uri, s3=s3, cache_dir=fresh, trust=trusting(keys["pub"]), runtime=runtime)
    assert refused.value.reason == reason and model_loads == []
    assert sorted(gets) == [f"{prefix}/manifest.json", f"{prefix}/manifest.sig"]  # nothing else fetched
    assert not [p for p in fresh.rglob("*") if p.is_file()]
    # a worker whose cache still holds the good copy does not take the attacked one either
    with pytest.raises(SignatureError):
        load_artifact(f"s3://{BUCKET}/models/colours-fast", s3=s3, cache_dir=cache, trust=trusting(keys["pub"]))
    with pytest.raises(SignatureError):  # nor the unsigned artifact the attacker could also make
        s3.delete_object(Bucket=BUCKET, Key=f"{prefix}/manifest.sig")
        load_artifact(uri, s3=s3, cache_dir=fresh, trust=trusting(keys["pub"]))
    assert model_loads == []


def test_a_pinned_digest_refuses_any_other_manifest(signed, keys, s3, tmp_path):
    uri = upload_artifact(signed, f"s3://{BUCKET}/models", s3=s3)
    digest = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    loaded = load_artifact(uri, s3=s3, cache_dir=tmp_path / "c", trust=TrustPolicy.from_config(None, digest))
    assert loaded.provenance.digest_pinned and loaded.provenance.manifest_sha256 == digest
    with pytest.raises(SignatureError, match="digest_mismatch"):
        load_artifact(uri, s3=s3, cache_dir=tmp_path / "d", trust=TrustPolicy.from_config(None, "1" * 64))


def test_the_worker_logs_what_it_serves_and_warns_when_unverified(signed, keys, caplog):
    from worker.classifier import Classifier

    caplog.set_level("INFO")
    Classifier.load(str(signed), trust=trusting(keys["pub"]))
    Classifier.load(str(signed), trust=TrustPolicy())
    verified = next(r for r in caplog.records if r.getMessage() == "model signature verified")
    unverified = next(r for r in caplog.records if r.getMessage().startswith("serving an unverified model"))
    assert unverified.levelname == "WARNING" and verified.levelname == "INFO"
    digest = hashlib.sha256((signed / "manifest.json").read_bytes()).hexdigest()
    for record, state in ((verified, "verified"), (unverified, "unverified")):
        model = record.model
        assert (model["name"], model["version"], model["manifest_sha256"], model["signature"]) == (
            "colours-fast", "v1", digest, state)


def test_registries_carry_the_signature(signed, keys, s3, tmp_path):
    """publish's two destinations keep manifest.sig beside manifest.json: a local registry and S3
    (whose cached copy then verifies offline, and a worker without a key caches it too)."""
    from trainer.registry import copy_to_local_registry

    version = copy_to_local_registry(signed, tmp_path / "registry")
    assert (version / "manifest.sig").read_bytes() == (signed / "manifest.sig").read_bytes()
    assert load_artifact(str(tmp_path / "registry" / "colours-fast"), trust=trusting(keys["pub"])).provenance.verified

    uri = upload_artifact(signed, f"s3://{BUCKET}/models", s3=s3)
    prefix = uri.split(f"s3://{BUCKET}/", 1)[1]
    assert s3.get_object(Bucket=BUCKET, Key=f"{prefix}/manifest.sig")["Body"].read() == (
        signed / "manifest.sig").read_bytes()
    cache = tmp_path / "cache"
    assert not load_artifact(uri, s3=s3, cache_dir=cache, trust=TrustPolicy()).provenance.verified
    gets = []
    s3.meta.events.register("provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"]))
    assert load_artifact(uri, s3=s3, cache_dir=cache, trust=trusting(keys["pub"])).provenance.verified
    assert set(gets) <= {f"{prefix}/manifest.json", f"{prefix}/manifest.sig"}  # no model file again
    gets.clear()
    assert load_artifact(uri, s3=s3, cache_dir=cache, trust=trusting(keys["pub"])).provenance.verified
    assert gets == []  # a pinned, cached, signed version: verified without S3


def test_the_lambda_handler_takes_its_trusted_key_from_its_environment(signed, keys, evil_savedmodel, model_loads,
                                                                      monkeypatch, aws_env):
    """The function's configuration (DOGBREEDS_TRUSTED_KEY: the inline PEM the template's
    TrustedPublicKey passes) is what the Lambda entry point verifies with, before loading."""
    from worker import handler
    from worker.settings import WorkerEnvironment

    monkeypatch.setattr(handler, "_pipeline", None)
    monkeypatch.setenv("DOGBREEDS_TRUSTED_KEY", " ".join(keys["pub"].read_text().split("\n")))  # on one line
    environment = WorkerEnvironment.from_env({"DOGBREEDS_MODEL": str(signed)})
    assert handler.get_pipeline(environment).classifier.artifact.provenance.verified
    monkeypatch.setattr(handler, "_pipeline", None)
    model_loads.clear()
    resign(signed, keys, evil_savedmodel)
    with pytest.raises(SignatureError, match="other_key"):
        handler.get_pipeline(environment)
    assert handler._pipeline is None and model_loads == []


def test_the_worker_cli_verifies_a_kms_signed_artifact_with_the_kms_key(signed, kms, keys, evil_savedmodel,
                                                                        model_loads, tmp_path):
    """Production's path: publish signs with kms:Sign, the worker is given kms://<key> and fetches
    its public key (kms:GetPublicKey); a file-key signature is then another key's."""
    from worker.cli import main

    client, key = kms
    sign_artifact(signed, KmsSigner.connect("alias/dogbreeds-signing", kms=client))
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(colour_photo(COLOUR_BREEDS["n02111889-Samoyed"], seed=4))
    args = ["predict", "--model", str(signed), "--json", "--trusted-key", f"kms://{key['Arn']}", str(photo)]
    served = CliRunner().invoke(main, args)
    assert served.exit_code == 0, served.output
    assert json.loads(served.stdout.splitlines()[-1])["breed"] == "Samoyed"
    model_loads.clear()
    sign_artifact(signed, FileSigner.from_file(keys["key"]))  # a valid signature, but not by the KMS key
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 1 and "[other_key]" in refused.output and model_loads == []


def test_publish_signs_with_a_kms_key_named_on_the_command_line(fast_colour_artifact, kms, keys, tmp_path):
    """`dogbreeds-train publish --sign-key kms://<alias>` (boto3's own KMS client, moto here): the
    published copy carries a KMS signature that the worker verifies with kms://<key ARN> and that a
    file key does not vouch for. (publish reuses an artifact already built in <run>/artifacts/.)"""
    from trainer.cli import main as train_cli

    client, key = kms
    run_dir = tmp_path / "run"
    shutil.copytree(fast_colour_artifact, run_dir / "artifacts" / "colours-fast-v1")
    result = CliRunner().invoke(train_cli, ["publish", str(run_dir), "--to", str(tmp_path / "registry"),
                                            "--name", "colours-fast", "--version", "v1",
                                            "--sign-key", "kms://alias/dogbreeds-signing"])
    assert result.exit_code == 0, result.output
    published = tmp_path / "registry" / "colours-fast"
    envelope = json.loads((published / "v1" / "manifest.sig").read_text())
    # (GetPublicKey's KeyId: the key ARN on AWS, the bare key id on moto)
    assert envelope["kms_key_arn"].endswith(key["KeyId"]) and envelope["key_id"] in result.output
    loaded = load_artifact(str(published), trust=TrustPolicy.from_config(f"kms://{key['Arn']}", kms=client))
    assert loaded.provenance.verified
    with pytest.raises(SignatureError, match="other_key"):
        load_artifact(str(published), trust=trusting(keys["pub"]))
    missing = CliRunner().invoke(train_cli, ["publish", str(run_dir), "--to", str(tmp_path / "other"),
                                             "--name", "colours-fast", "--version", "v1",
                                             "--sign-key", "kms://alias/missing"])
    assert missing.exit_code != 0 and "alias/missing" in missing.output and not (tmp_path / "other").exists()

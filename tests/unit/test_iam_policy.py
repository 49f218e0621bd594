"""Least privilege of infra/template.yaml, read statically after the SAM translation: the worker's
role may read photos (incoming/*) and the one model version it serves (ModelUri), write manifests
(manifests/*), list only under incoming/ (and tell a missing photo from a denied one), never write
under models/, read the public key of its trusted KMS key only, and consume only its own queue (and
send to it: continuation pages); the queue accepts messages from its bucket only. Each policy is
also evaluated with moto's IAM policy evaluator (which matches actions and resources, and ignores
conditions: the s3:prefix condition is evaluated here by hand), and the role's policies are
enforced by moto on real requests of an IAM user holding them."""

from __future__ import annotations

import json
import re

import pytest

from infra.sam_translate import Resolver, TranslatorUnavailable, translate

ACCOUNT, REGION, STACK = "123456789012", "us-east-1", "dogbreeds-prod"
QUEUE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-PhotoQueue-ABC"
DLQ_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-DeadLetterQueue-DEF"
LOG_GROUP_ARN = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{STACK}-worker:*"

VERSION = "20250101T000000Z"
DEFAULTS = {"ModelUri": f"s3://{STACK}-{ACCOUNT}/models/dogbreeds/{VERSION}"}
CUSTOM = {"BucketName": "acme-dog-photos", "IncomingPrefix": "uploads/photos", "ModelsPrefix": "registry",
          "ManifestPrefix": "out/manifests", "ModelUri": f"s3://acme-dog-photos/registry/dogbreeds/{VERSION}"}
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
SIGNED = {**DEFAULTS, "TrustedKmsKeyArn": KMS_KEY}


@pytest.fixture(scope="module")
def template() -> dict:
    try:
        return translate()
    except TranslatorUnavailable as missing:
        pytest.skip(str(missing))


def resolver(template, parameters) -> Resolver:
    return Resolver(template, parameters, pseudo={"AWS::AccountId": ACCOUNT, "AWS::Region": REGION,
                                                  "AWS::StackName": STACK},
                    refs={"PhotoQueue": f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{STACK}-PhotoQueue-ABC",
                          "WorkerLogGroup": f"/aws/lambda/{STACK}-worker"},
                    attributes={"PhotoQueue.Arn": QUEUE_ARN, "DeadLetterQueue.Arn": DLQ_ARN})


def expected_paths(parameters) -> dict[str, str]:
    values = {"BucketName": f"{STACK}-{ACCOUNT}", "IncomingPrefix": "incoming", "ModelsPrefix": "models",
              "ManifestPrefix": "manifests", **parameters}
    bucket = f"arn:aws:s3:::{values['BucketName']}"
    return {"bucket": bucket, "incoming": f"{bucket}/{values['IncomingPrefix']}/",
            "models": f"{bucket}/{values['ModelsPrefix']}/", "manifests": f"{bucket}/{values['ManifestPrefix']}/",
            "incoming_prefix": values["IncomingPrefix"] + "/",
            "served": "arn:aws:s3:::" + values["ModelUri"].removeprefix("s3://") + "/"}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def role_policies(template, parameters) -> dict[str, dict]:
    """The role's inline policies, and the policies attached to it whose condition holds."""
    resources = template["Resources"]
    resolve = resolver(template, parameters)
    policies = {p["PolicyName"]: resolve(p["PolicyDocument"]) for p in resources["WorkerRole"]["Properties"]["Policies"]}
    for resource in resources.values():
        if resource["Type"] == "AWS::IAM::Policy" and (not resource.get("Condition")
                                                       or resolve.condition(resource["Condition"])):
            assert resource["Properties"]["Roles"] == [{"Ref": "WorkerRole"}]
            policies[resource["Properties"]["PolicyName"]] = resolve(resource["Properties"]["PolicyDocument"])
    return policies


def statements(template, parameters) -> list[dict]:
    return [s for doc in role_policies(template, parameters).values() for s in as_list(doc["Statement"])]


def allows(template, parameters) -> list[dict]:
    return [s for s in statements(template, parameters) if s["Effect"] == "Allow"]


def test_the_function_runs_with_the_one_spelled_out_role(template):
    resources = template["Resources"]
    roles = {k for k, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    assert roles == {"WorkerRole"}  # SAM made no role of its own (it would attach a managed policy)
    assert not [k for k, r in resources.items() if r["Type"] == "AWS::IAM::ManagedPolicy"]
    # the one policy outside the role: the trusted KMS key's, only when there is one
    policies = {k: r for k, r in resources.items() if r["Type"] == "AWS::IAM::Policy"}
    assert list(policies) == ["WorkerTrustedKeyPolicy"]
    assert policies["WorkerTrustedKeyPolicy"]["Condition"] == "HasTrustedKmsKey"
    role = resources["WorkerRole"]["Properties"]
    assert not role.get("ManagedPolicyArns") and "PermissionsBoundary" not in role
    functions = {k: r for k, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}
    assert list(functions) == ["WorkerFunction"]
    assert functions["WorkerFunction"]["Properties"]["Role"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    trust = as_list(role["AssumeRolePolicyDocument"]["Statement"])
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM, SIGNED], ids=["default-prefixes", "custom-prefixes", "kms"])
def test_every_statement_is_a_narrow_allow_or_the_models_deny(template, parameters):
    denies = [s for s in statements(template, parameters) if s["Effect"] != "Allow"]
    assert [(s["Effect"], s["Resource"]) for s in denies] == [("Deny", expected_paths(parameters)["models"] + "*")]
    assert {"s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion"} <= set(denies[0]["Action"])
    for statement in statements(template, parameters):
        assert not {"NotAction", "NotResource", "NotPrincipal", "Principal"} & set(statement), statement
        for action in as_list(statement["Action"]):
            assert re.fullmatch(r"[a-z0-9]+:[A-Za-z]+", action), f"wildcard or odd action {action!r}"
        for resource in as_list(statement["Resource"]):
            assert resource != "*" and not resource.endswith(":*:*"), statement
            if resource.startswith("arn:aws:s3:::"):
                # object ARNs end in '<prefix>/*' (a wildcard only after a prefix), bucket ARNs have no '*'
                bucket, _, key = resource[len("arn:aws:s3:::"):].partition("/")
                assert "*" not in bucket and (not key or re.fullmatch(r"[^*]+/\*", key)), resource


def list_bucket_allowed(statement: dict, prefix: str | None) -> bool:
    """The ListBucket statement's condition, evaluated as IAM does (moto's evaluator ignores
    conditions): StringLike(IfExists) with '*' wildcards; ``prefix`` None = no s3:prefix key in the
    request context (S3's check on a GetObject of a missing key)."""
    import fnmatch

    ((operator, condition),) = statement["Condition"].items()
    ((key, patterns),) = condition.items()
    assert key == "s3:prefix" and operator in ("StringLike", "StringLikeIfExists"), statement["Condition"]
    if prefix is None:
        return operator.endswith("IfExists")
    return any(fnmatch.fnmatchcase(prefix, p) for p in as_list(patterns))


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_s3_access_is_read_incoming_and_the_served_model_write_manifests_list_incoming(template, parameters):
    paths = expected_paths(parameters)
    grants: dict[str, set[str]] = {}
    for statement in allows(template, parameters):
        for action in as_list(statement["Action"]):
            if action.startswith("s3:"):
                grants.setdefault(action, set()).update(as_list(statement["Resource"]))
    assert grants == {
        "s3:GetObject": {paths["incoming"] + "*", paths["served"] + "*"},  # not other versions, not latest
        "s3:PutObject": {paths["manifests"] + "*"},
        "s3:ListBucket": {paths["bucket"]},
    }


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_listing_is_under_incoming_only_and_a_missing_photo_is_not_found_not_denied(template, parameters):
    """S3 answers a GetObject of a missing key with 404 only to a caller allowed s3:ListBucket on
    the bucket (else 403, which the worker would report as access_denied). That check carries no
    s3:prefix, so the grant must hold without one; listings with a prefix stay under incoming/."""
    paths = expected_paths(parameters)
    (statement,) = [s for s in allows(template, parameters) if "s3:ListBucket" in as_list(s["Action"])]
    assert list_bucket_allowed(statement, None)  # the missing-key check: not_found
    assert list_bucket_allowed(statement, paths["incoming_prefix"] + "shoot-2026/")
    assert list_bucket_allowed(statement, paths["incoming_prefix"])
    for elsewhere in ("", "models/", paths["manifests"].split(":::", 1)[1].split("/", 1)[1], "incoming-not/"):
        if not elsewhere.startswith(paths["incoming_prefix"]):
            assert not list_bucket_allowed(statement, elsewhere), elsewhere


def test_the_trusted_kms_key_may_only_be_read_for_its_public_key(template):
    assert "kms" not in {a.split(":")[0] for s in statements(template, DEFAULTS) for a in as_list(s["Action"])}
    kms = [s for s in statements(template, SIGNED) if any(a.startswith("kms:") for a in as_list(s["Action"]))]
    assert [(s["Effect"], s["Action"], s["Resource"]) for s in kms] == [("Allow", "kms:GetPublicKey", KMS_KEY)]


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_sqs_and_logs_access_is_its_own_queue_and_log_group(template, parameters):
    by_service: dict[str, dict[str, set[str]]] = {}
    for statement in statements(template, parameters):
        for action in as_list(statement["Action"]):
            service, name = action.split(":")
            by_service.setdefault(service, {}).setdefault(name, set()).update(as_list(statement["Resource"]))
    assert set(by_service) == {"s3", "sqs", "logs"}
    assert by_service["sqs"] == {a: {QUEUE_ARN} for a in ("ReceiveMessage", "DeleteMessage", "GetQueueAttributes",
                                                          "SendMessage")}
    assert by_service["logs"] == {a: {LOG_GROUP_ARN} for a in ("CreateLogStream", "PutLogEvents")}


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_moto_policy_evaluation_agrees(template, parameters):
    from moto.iam.access_control import IAMPolicy, PermissionResult

    paths = expected_paths(parameters)
    policies = [IAMPolicy(json.dumps(doc)) for doc in role_policies(template, parameters).values()]

    def allowed(action: str, resource: str) -> bool:
        results = [p.is_action_permitted(action, resource) for p in policies]
        return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results

    incoming, models, manifests, bucket = paths["incoming"], paths["models"], paths["manifests"], paths["bucket"]
    served = paths["served"]
    cases = [
        ("s3:GetObject", incoming + "Samoyed 1.jpg", True),
        ("s3:GetObject", served + "model-openvino-int8/model.bin", True),
        ("s3:GetObject", served + "manifest.sig", True),
        ("s3:GetObject", models + "dogbreeds/latest", False),  # the served version is pinned
        ("s3:GetObject", models + "dogbreeds/20240101T000000Z/model/saved_model.pb", False),
        ("s3:PutObject", served + "manifest.json", False),
        ("s3:PutObject", served + "manifest.sig", False),
        ("s3:DeleteObject", served + "manifest.json", False),
        ("s3:PutObject", models + "dogbreeds/20990101T000000Z/manifest.json", False),
        ("s3:PutObject", manifests + "0f3a.json", True),
        ("sqs:ReceiveMessage", QUEUE_ARN, True),
        ("sqs:DeleteMessage", QUEUE_ARN, True),
        ("s3:GetObject", manifests + "0f3a.json", False),
        ("s3:GetObject", bucket + "/elsewhere/x.jpg", False),
        ("s3:GetObject", paths["incoming"].rstrip("/") + "-not/x.jpg", False),  # a prefix is a folder, not a stem
        ("s3:GetObject", "arn:aws:s3:::someone-elses-bucket/incoming/x.jpg", False),
        ("s3:PutObject", incoming + "x.jpg", False),
        ("s3:PutObject", models + "dogbreeds/latest", False),  # the worker cannot replace the model
        ("s3:PutObject", bucket + "/x.json", False),
        ("s3:DeleteObject", incoming + "x.jpg", False),
        ("s3:DeleteObject", manifests + "0f3a.json", False),
        ("s3:PutBucketPolicy", bucket, False),
        ("s3:PutBucketNotification", bucket, False),
        ("sqs:SendMessage", QUEUE_ARN, True),  # continuation pages of a long prefix job
        ("sqs:SendMessage", DLQ_ARN, False),
        ("sqs:SendMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:another-queue", False),
        ("sqs:ReceiveMessage", DLQ_ARN, False),
        ("sqs:PurgeQueue", QUEUE_ARN, False),
        ("sqs:ReceiveMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:another-queue", False),
        ("kms:Sign", KMS_KEY, False),
        ("kms:GetPublicKey", KMS_KEY, False),  # no trusted KMS key configured
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", False),
        ("lambda:InvokeFunction", f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{STACK}-worker", False),
    ]
    wrong = [(action, resource, expected) for action, resource, expected in cases
             if allowed(action, resource) != expected]
    assert not wrong, wrong


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_the_queue_takes_messages_from_its_bucket_only(template, parameters):
    resources = template["Resources"]
    resolve = resolver(template, parameters)
    policy = resolve(resources["PhotoQueuePolicy"]["Properties"])
    assert policy["Queues"] == [resolve({"Ref": "PhotoQueue"})]
    (statement,) = as_list(policy["PolicyDocument"]["Statement"])
    assert statement["Effect"] == "Allow" and statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage" and statement["Resource"] == QUEUE_ARN
    bucket_arn = resolve({"Fn::GetAtt": ["PhotoBucket", "Arn"]})
    assert bucket_arn == expected_paths(parameters)["bucket"]
    assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": bucket_arn},
                                      "StringEquals": {"aws:SourceAccount": ACCOUNT}}
    # S3 checks the permission when the notification is put: the policy must exist first
    assert "PhotoQueuePolicy" in as_list(resources["PhotoBucket"].get("DependsOn", []))


def test_moto_policy_evaluation_with_a_trusted_kms_key(template):
    from moto.iam.access_control import IAMPolicy, PermissionResult

    policies = [IAMPolicy(json.dumps(doc)) for doc in role_policies(template, SIGNED).values()]

    def allowed(action: str, resource: str) -> bool:
        results = [p.is_action_permitted(action, resource) for p in policies]
        return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results

    other_key = KMS_KEY[:-4] + "ffff"
    assert [allowed(a, r) for a, r in [("kms:GetPublicKey", KMS_KEY), ("kms:GetPublicKey", other_key),
                                       ("kms:Sign", KMS_KEY), ("kms:Verify", KMS_KEY), ("kms:Decrypt", KMS_KEY)]] == [
        True, False, False, False, False]


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_moto_refuses_the_roles_writes_to_models_on_real_requests(template, parameters, aws_env):
    """An IAM user holding exactly the role's policies, with moto enforcing IAM on every request
    after the set-up: it reads a photo and the served model version, writes a manifest, and is
    refused PutObject/DeleteObject under models/ (the model registry) and reads of other versions."""
    import boto3
    from moto import mock_aws, settings
    from moto.core.authorization import ActionAuthenticatorMixin

    paths = expected_paths(parameters)
    bucket = paths["bucket"].removeprefix("arn:aws:s3:::")
    served = paths["served"].removeprefix(f"arn:aws:s3:::{bucket}/")
    models = paths["models"].removeprefix(f"arn:aws:s3:::{bucket}/")
    incoming = paths["incoming"].removeprefix(f"arn:aws:s3:::{bucket}/")
    manifests = paths["manifests"].removeprefix(f"arn:aws:s3:::{bucket}/")
    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    with mock_aws():
        try:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = 10**9  # the set-up runs unauthenticated
            admin, iam = boto3.client("s3", region_name=REGION), boto3.client("iam", region_name=REGION)
            admin.create_bucket(Bucket=bucket)
            for key in (incoming + "dog.jpg", served + "manifest.json", models + "dogbreeds/latest"):
                admin.put_object(Bucket=bucket, Key=key, Body=b"original")
            iam.create_user(UserName="worker")
            for name, document in role_policies(template, parameters).items():
                iam.put_user_policy(UserName="worker", PolicyName=name, PolicyDocument=json.dumps(document))
            key = iam.create_access_key(UserName="worker")["AccessKey"]
            settings.INITIAL_NO_AUTH_ACTION_COUNT = ActionAuthenticatorMixin.request_count  # enforced from here
            worker = boto3.client("s3", region_name=REGION, aws_access_key_id=key["AccessKeyId"],
                                  aws_secret_access_key=key["SecretAccessKey"])

            def outcome(call) -> str:
                try:
                    call()
                    return "ok"
                except worker.exceptions.ClientError as error:
                    return error.response["Error"]["Code"]

            assert outcome(lambda: worker.get_object(Bucket=bucket, Key=incoming + "dog.jpg")) == "ok"
            assert outcome(lambda: worker.get_object(Bucket=bucket, Key=served + "manifest.json")) == "ok"
            assert outcome(lambda: worker.put_object(Bucket=bucket, Key=manifests + "job.json", Body=b"{}")) == "ok"
            for attempt in (lambda: worker.put_object(Bucket=bucket, Key=served + "manifest.json", Body=b"evil"),
                            lambda: worker.put_object(Bucket=bucket, Key=models + "dogbreeds/latest", Body=b"evil"),
                            lambda: worker.delete_object(Bucket=bucket, Key=served + "manifest.json"),
                            lambda: worker.get_object(Bucket=bucket, Key=models + "dogbreeds/latest")):
                assert outcome(attempt) == "AccessDenied"
        finally:
            settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
        assert admin.get_object(Bucket=bucket, Key=served + "manifest.json")["Body"].read() == b"original"

"""Least privilege of infra/template.yaml, read statically after the SAM translation: the worker's
role may read photos (incoming/*) and models (models/*), write manifests (manifests/*), list only
under incoming/, and consume only its own queue (and send to it: continuation pages); the queue
accepts messages from its bucket only. Each policy is also evaluated with moto's IAM policy evaluator (which matches actions and
resources, and ignores StringLike conditions: the s3:prefix condition is checked by hand)."""

from __future__ import annotations

import json
import re

import pytest

from infra.sam_translate import Resolver, TranslatorUnavailable, translate

ACCOUNT, REGION, STACK = "123456789012", "us-east-1", "dogbreeds-prod"
QUEUE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-PhotoQueue-ABC"
DLQ_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-DeadLetterQueue-DEF"
LOG_GROUP_ARN = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/lambda/{STACK}-worker:*"

DEFAULTS = {}
CUSTOM = {"BucketName": "acme-dog-photos", "IncomingPrefix": "uploads/photos", "ModelsPrefix": "registry",
          "ManifestPrefix": "out/manifests"}


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
            "incoming_prefix": values["IncomingPrefix"] + "/"}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def role_policies(template, parameters) -> dict[str, dict]:
    role = template["Resources"]["WorkerRole"]["Properties"]
    resolve = resolver(template, parameters)
    return {p["PolicyName"]: resolve(p["PolicyDocument"]) for p in role["Policies"]}


def statements(template, parameters) -> list[dict]:
    return [s for doc in role_policies(template, parameters).values() for s in as_list(doc["Statement"])]


def test_the_function_runs_with_the_one_spelled_out_role(template):
    resources = template["Resources"]
    roles = {k for k, r in resources.items() if r["Type"] == "AWS::IAM::Role"}
    assert roles == {"WorkerRole"}  # SAM made no role of its own (it would attach a managed policy)
    assert not [k for k, r in resources.items() if r["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy")]
    role = resources["WorkerRole"]["Properties"]
    assert not role.get("ManagedPolicyArns") and "PermissionsBoundary" not in role
    functions = {k: r for k, r in resources.items() if r["Type"] == "AWS::Lambda::Function"}
    assert list(functions) == ["WorkerFunction"]
    assert functions["WorkerFunction"]["Properties"]["Role"] == {"Fn::GetAtt": ["WorkerRole", "Arn"]}
    trust = as_list(role["AssumeRolePolicyDocument"]["Statement"])
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_every_statement_is_a_narrow_allow(template, parameters):
    for statement in statements(template, parameters):
        assert statement["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal", "Principal"} & set(statement), statement
        for action in as_list(statement["Action"]):
            assert re.fullmatch(r"[a-z0-9]+:[A-Za-z]+", action), f"wildcard or odd action {action!r}"
        for resource in as_list(statement["Resource"]):
            assert resource != "*" and not resource.endswith(":*:*"), statement
            if resource.startswith("arn:aws:s3:::"):
                # object ARNs end in '<prefix>/*' (a wildcard only after a prefix), bucket ARNs have no '*'
                bucket, _, key = resource[len("arn:aws:s3:::"):].partition("/")
                assert "*" not in bucket and (not key or re.fullmatch(r"[^*]+/\*", key)), resource


@pytest.mark.parametrize("parameters", [DEFAULTS, CUSTOM], ids=["default-prefixes", "custom-prefixes"])
def test_s3_access_is_read_incoming_and_models_write_manifests_list_incoming(template, parameters):
    paths = expected_paths(parameters)
    grants: dict[str, set[str]] = {}
    for statement in statements(template, parameters):
        for action in as_list(statement["Action"]):
            if action.startswith("s3:"):
                grants.setdefault(action, set()).update(as_list(statement["Resource"]))
                if action == "s3:ListBucket":
                    # listing only under the incoming prefix (prefix jobs), never the whole bucket
                    prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
                    assert set(statement["Condition"]) == {"StringLike"}
                    assert all(p.startswith(paths["incoming_prefix"]) for p in as_list(prefixes)), prefixes
    assert grants == {
        "s3:GetObject": {paths["incoming"] + "*", paths["models"] + "*"},
        "s3:PutObject": {paths["manifests"] + "*"},
        "s3:ListBucket": {paths["bucket"]},
    }


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
    cases = [
        ("s3:GetObject", incoming + "Samoyed 1.jpg", True),
        ("s3:GetObject", models + "dogbreeds/latest", True),
        ("s3:GetObject", models + "dogbreeds/20250101T000000Z/model/saved_model.pb", True),
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

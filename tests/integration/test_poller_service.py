"""infra/poller-service.yaml: the poller as an ECS Fargate service.

Read statically (a CloudFormation-aware YAML loader and infra/sam_translate.py's Resolver): the same
image and entry point as `dogbreeds-worker run`, the same IAM boundaries as the Lambda function's
role in infra/template.yaml (plus changing message visibility), scaling on the queue backlog per
running task, a graceful stop within the stop timeout, logs to CloudWatch. Then deployed into moto's
CloudFormation (which creates everything but the Application Auto Scaling resources: those are put
through the API, as AWS would take them), and run: the container's command and environment, resolved
from the template, drain a moto queue and stop cleanly on SIGTERM with no message left in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import yaml

from infra.sam_translate import ROOT, Resolver

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Tried to parse AWS:UserWarning")]
TEMPLATE = ROOT / "infra" / "poller-service.yaml"
MAIN_TEMPLATE = ROOT / "infra" / "template.yaml"
ACCOUNT, REGION, STACK = "123456789012", "us-east-1", "dogbreeds-poller"
MODEL_URI = "s3://acme-dog-photos/models/dogbreeds/20260301T000000Z"
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
REQUIRED = {"BucketName": "acme-dog-photos", "QueueName": "dogbreeds-PhotoQueue-ABC", "ImageRepository": "dogbreeds-worker",
            "ModelUri": MODEL_URI,
            "VpcId": "vpc-0123", "Subnets": "subnet-1,subnet-2"}
QUEUE_ARN = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{REQUIRED['QueueName']}"
PSEUDO = {"AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::StackName": STACK}
REFS = {"Cluster": "dogbreeds-poller-Cluster-X", "PollerLogGroup": f"/ecs/{STACK}-poller",
        "TaskDefinition": "arn:aws:ecs:us-east-1:123456789012:task-definition/p:1", "TaskSecurityGroup": "sg-1",
        "ScalableTarget": "service/c/s|ecs:service:DesiredCount|ecs"}
ATTRIBUTES = {"Service.Name": "dogbreeds-poller-Service-Y", "TaskRole.Arn": "arn:aws:iam::1:role/t",
              "ExecutionRole.Arn": "arn:aws:iam::1:role/e"}


class CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short tags (!Ref, !Sub, !GetAtt, ...) read as their long forms."""


def _intrinsic(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if suffix == "Ref" else "Condition" if suffix == "Condition" else f"Fn::{suffix}": value}


CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=CloudFormationLoader)


@pytest.fixture(scope="module")
def template() -> dict:
    return load(TEMPLATE)


def resolver(template, **parameters) -> Resolver:
    return Resolver(template, {**REQUIRED, **parameters}, pseudo=PSEUDO, refs=REFS, attributes=ATTRIBUTES)


def container(template, **parameters) -> dict:
    definition = template["Resources"]["TaskDefinition"]["Properties"]
    (only,) = definition["ContainerDefinitions"]
    return resolver(template, **parameters)(only)


def environment(template, **parameters) -> dict[str, str]:
    return {v["Name"]: str(v["Value"]) for v in container(template, **parameters)["Environment"]}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------- the container


def test_the_task_runs_the_worker_images_poller_on_fargate(template):
    resources = template["Resources"]
    definition = resolver(template)(resources["TaskDefinition"]["Properties"])
    assert definition["RequiresCompatibilities"] == ["FARGATE"] and definition["NetworkMode"] == "awsvpc"
    assert definition["RuntimePlatform"] == {"OperatingSystemFamily": "LINUX", "CpuArchitecture": "X86_64"}
    poller = container(template, ImageTag="20260301")
    assert poller["Image"] == f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/dogbreeds-worker:20260301"
    # the image's entry point is the Lambda runtime; the task runs its console script instead
    assert poller["EntryPoint"] == ["dogbreeds-worker"] and poller["Command"][0] == "run"
    assert 'dogbreeds-worker = "worker.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert "awslambdaric" in (ROOT / "infra" / "Dockerfile").read_text()
    assert poller["Essential"] is True
    service = resolver(template)(resources["Service"]["Properties"])
    assert service["LaunchType"] == "FARGATE"
    assert resources["Service"]["Properties"]["TaskDefinition"] == {"Ref": "TaskDefinition"}
    assert "DesiredCount" not in resources["Service"]["Properties"]  # the scaling policy owns it
    network = service["NetworkConfiguration"]["AwsvpcConfiguration"]
    assert network["Subnets"] == REQUIRED["Subnets"] and network["AssignPublicIp"] == "DISABLED"


def test_the_command_line_is_one_the_worker_accepts(template):
    """The container's command, resolved, parsed by the worker's own CLI (an unknown option fails)."""
    from worker.cli import main

    poller = container(template)
    run = main.commands[poller["Command"][0]]
    with run.make_context("run", list(poller["Command"][1:]) + ["--model", "m", "--queue-url", "q"]) as ctx:
        assert ctx.params["wait_seconds"] == int(template["Parameters"]["PollWaitSeconds"]["Default"])
        assert ctx.params["visibility_timeout"] == int(template["Parameters"]["VisibilityTimeout"]["Default"])


def test_the_environment_points_the_poller_at_the_main_stacks_queue_bucket_and_model(template):
    from worker.settings import ENV

    env = environment(template)
    assert env["DOGBREEDS_QUEUE_URL"] == f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT}/{REQUIRED['QueueName']}"
    assert env["DOGBREEDS_OUTPUT_BUCKET"] == REQUIRED["BucketName"] and env["DOGBREEDS_OUTPUT_PREFIX"] == "manifests"
    assert env["DOGBREEDS_MODEL"] == MODEL_URI  # a pinned version, as in the main stack
    assert environment(template, ModelUri="s3://b/models/x/v1")["DOGBREEDS_MODEL"] == "s3://b/models/x/v1"
    assert "Default" not in template["Parameters"]["ModelUri"]
    main = load(MAIN_TEMPLATE)["Parameters"]
    for name in ("ModelUri", "ModelDigest", "TrustedKmsKeyArn"):
        assert template["Parameters"][name]["AllowedPattern"] == main[name]["AllowedPattern"], name
    assert env["DOGBREEDS_TRUSTED_KEY"] == env["DOGBREEDS_MODEL_DIGEST"] == ""  # empty: unset to the worker
    from worker.signature import TrustPolicy

    assert TrustPolicy.from_env(env) == TrustPolicy()
    signed = environment(template, TrustedKmsKeyArn=KMS_KEY, ModelDigest="ab" * 32)
    assert signed["DOGBREEDS_TRUSTED_KEY"] == f"kms://{KMS_KEY}" and signed["DOGBREEDS_MODEL_DIGEST"] == "ab" * 32
    pem = "-----BEGIN PUBLIC KEY----- MCowBQYDK2VwAyEA2nXZp6bLwTsg2Oj6lbI0xC1Mot8SYxiQdB1m9Dsn8Qk= -----END PUBLIC KEY-----"
    assert environment(template, TrustedPublicKey=pem)["DOGBREEDS_TRUSTED_KEY"] == pem
    assert env["DOGBREEDS_CACHE"].startswith("/tmp/")
    assert {k for k in env if k.startswith("DOGBREEDS_")} <= set(ENV)  # only variables the worker reads
    # one inference thread per vCPU of the task, for every size it may have
    for cpu in template["Parameters"]["TaskCpu"]["AllowedValues"]:
        assert environment(template, TaskCpu=cpu)["DOGBREEDS_THREADS"] == str(int(cpu) // 1024)


# ----------------------------------------------------------------------------- IAM


def attached_statements(template, resolve, role: str) -> list[dict]:
    """The statements of a role's inline policies and of the AWS::IAM::Policy resources attached to
    it whose condition holds."""
    resources = template["Resources"]
    documents = [p["PolicyDocument"] for p in resources[role]["Properties"]["Policies"]]
    documents += [r["Properties"]["PolicyDocument"] for r in resources.values()
                  if r["Type"] == "AWS::IAM::Policy" and r["Properties"]["Roles"] == [{"Ref": role}]
                  and (not r.get("Condition") or resolve.condition(r["Condition"]))]
    return [s for d in documents for s in as_list(resolve(d)["Statement"])]


def role_statements(template, resource: str, **parameters) -> list[dict]:
    resolve = Resolver(template, {**REQUIRED, **parameters}, pseudo=PSEUDO, refs=REFS, attributes=ATTRIBUTES)
    return attached_statements(template, resolve, resource)


def grants(statements: list[dict]) -> set[tuple]:
    """(effect, action, resource, condition) tuples, for comparing roles."""
    return {(s["Effect"], action, resource, json.dumps(s.get("Condition"), sort_keys=True))
            for s in statements for action in as_list(s["Action"]) for resource in as_list(s["Resource"])}


CUSTOM = {"IncomingPrefix": "uploads/photos", "ModelsPrefix": "registry", "ManifestPrefix": "out/manifests"}


@pytest.mark.parametrize("parameters", [{}, CUSTOM, {"TrustedKmsKeyArn": KMS_KEY}],
                         ids=["default-prefixes", "custom-prefixes", "kms"])
def test_the_task_role_has_the_lambda_roles_boundaries_plus_changing_visibility(template, parameters):
    main = load(MAIN_TEMPLATE)
    resolve_main = Resolver(main, {"BucketName": REQUIRED["BucketName"], "ModelUri": MODEL_URI, **parameters},
                            pseudo=PSEUDO, refs={"WorkerLogGroup": "/aws/lambda/x", "WorkerRole": "worker-role"},
                            attributes={"PhotoQueue.Arn": QUEUE_ARN})
    lambda_grants = grants(attached_statements(main, resolve_main, "WorkerRole"))
    task_grants = grants(role_statements(template, "TaskRole", **parameters))
    for service in ("s3", "kms"):  # the same photos, served model, manifests, models deny, signing key
        assert {g for g in task_grants if g[1].startswith(service + ":")} == {
            g for g in lambda_grants if g[1].startswith(service + ":")}, service
    sqs = {g for g in lambda_grants if g[1].startswith("sqs:")}
    assert {g for g in task_grants if g[1].startswith("sqs:")} == sqs | {
        ("Allow", "sqs:ChangeMessageVisibility", QUEUE_ARN, "null")}
    # nothing else (its logs go through the awslogs driver, with the execution role)
    assert {g[1].split(":")[0] for g in task_grants} == {"s3", "sqs"} | ({"kms"} if parameters.get("TrustedKmsKeyArn")
                                                                        else set())
    trust = template["Resources"]["TaskRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "ecs-tasks.amazonaws.com"}]
    assert resolver(template)(trust)[0]["Condition"] == {"StringEquals": {"aws:SourceAccount": ACCOUNT}}


def test_the_execution_role_pulls_only_the_worker_image_and_writes_only_its_log_group(template):
    statements = role_statements(template, "ExecutionRole")
    by_action = {}
    for s in statements:
        assert s["Effect"] == "Allow"
        for action in as_list(s["Action"]):
            by_action.setdefault(action, set()).update(as_list(s["Resource"]))
    repository = f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{REQUIRED['ImageRepository']}"
    log_group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{REFS['PollerLogGroup']}:*"
    assert by_action == {"ecr:GetAuthorizationToken": {"*"},  # takes no resource
                         "ecr:BatchCheckLayerAvailability": {repository}, "ecr:GetDownloadUrlForLayer": {repository},
                         "ecr:BatchGetImage": {repository},
                         "logs:CreateLogStream": {log_group}, "logs:PutLogEvents": {log_group}}


def test_moto_policy_evaluation_of_the_task_role(template):
    from moto.iam.access_control import IAMPolicy, PermissionResult

    role = template["Resources"]["TaskRole"]["Properties"]
    resolve = resolver(template)
    policies = [IAMPolicy(json.dumps(resolve(p["PolicyDocument"]))) for p in role["Policies"]]
    served = "arn:aws:s3:::" + MODEL_URI.removeprefix("s3://")

    def allowed(action: str, resource: str) -> bool:
        results = [p.is_action_permitted(action, resource) for p in policies]
        return PermissionResult.DENIED not in results and PermissionResult.PERMITTED in results

    bucket = f"arn:aws:s3:::{REQUIRED['BucketName']}"
    cases = [
        ("s3:GetObject", f"{bucket}/incoming/Samoyed 1.jpg", True),
        ("s3:GetObject", f"{served}/model-openvino-int8/model.bin", True),
        ("s3:GetObject", f"{bucket}/models/dogbreeds/latest", False),  # the served version is pinned
        ("s3:PutObject", f"{served}/manifest.json", False),
        ("s3:DeleteObject", f"{served}/manifest.json", False),
        ("s3:PutObject", f"{bucket}/manifests/0f3a.json", True),
        ("sqs:ReceiveMessage", QUEUE_ARN, True),
        ("sqs:DeleteMessage", QUEUE_ARN, True),
        ("sqs:ChangeMessageVisibility", QUEUE_ARN, True),
        ("s3:PutObject", f"{bucket}/models/dogbreeds/latest", False),
        ("s3:PutObject", f"{bucket}/incoming/x.jpg", False),
        ("s3:GetObject", f"{bucket}/manifests/0f3a.json", False),
        ("s3:DeleteObject", f"{bucket}/incoming/x.jpg", False),
        ("sqs:SendMessage", QUEUE_ARN, True),  # continuation pages of a long prefix job
        ("sqs:SendMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:{REQUIRED['QueueName']}-dlq", False),
        ("sqs:PurgeQueue", QUEUE_ARN, False),
        ("sqs:ReceiveMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:{REQUIRED['QueueName']}-dlq", False),
        ("sqs:ReceiveMessage", f"arn:aws:sqs:{REGION}:{ACCOUNT}:another-queue", False),
        ("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", False),
    ]
    wrong = [case for case in cases if allowed(case[0], case[1]) != case[2]]
    assert not wrong, wrong
    # the explicit Deny wins over an Allow: manifests configured under the model registry are not written
    documents = [resolver(template, ManifestPrefix="models/manifests")(p["PolicyDocument"]) for p in role["Policies"]]
    policies = [IAMPolicy(json.dumps(d)) for d in documents]
    assert not allowed("s3:PutObject", f"{bucket}/models/manifests/0f3a.json")
    policies = [IAMPolicy(json.dumps({**d, "Statement": [s for s in as_list(d["Statement"]) if s["Effect"] == "Allow"]}))
                for d in documents]
    assert allowed("s3:PutObject", f"{bucket}/models/manifests/0f3a.json")  # it is the Deny that refuses it


# ----------------------------------------------------------------------------- scaling, stop, logs


def test_desired_count_tracks_the_queue_backlog_per_running_task(template):
    resources = template["Resources"]
    resolve = resolver(template, TargetBacklogPerTask="250")
    target = resolve(resources["ScalableTarget"]["Properties"])
    assert target["ServiceNamespace"] == "ecs" and target["ScalableDimension"] == "ecs:service:DesiredCount"
    assert target["ResourceId"] == f"service/{REFS['Cluster']}/{ATTRIBUTES['Service.Name']}"
    assert int(template["Parameters"]["MinTasks"]["MinValue"]) >= 1  # m1 / m2 needs a running task to see
    policy = resolve(resources["BacklogPerTaskPolicy"]["Properties"])
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert resources["BacklogPerTaskPolicy"]["Properties"]["ScalingTargetId"] == {"Ref": "ScalableTarget"}
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert float(tracking["TargetValue"]) == 250
    metrics = {m["Id"]: m for m in tracking["CustomizedMetricSpecification"]["Metrics"]}
    returned = [m for m in metrics.values() if m.get("ReturnData", True)]
    assert len(returned) == 1
    expression = returned[0]["Expression"].replace(" ", "")
    numerator, denominator = expression.split("/")
    visible = metrics[numerator]["MetricStat"]
    assert visible["Metric"] == {"Namespace": "AWS/SQS", "MetricName": "ApproximateNumberOfMessagesVisible",
                                 "Dimensions": [{"Name": "QueueName", "Value": REQUIRED["QueueName"]}]}
    running = metrics[denominator]["MetricStat"]
    assert running["Metric"]["Namespace"] == "ECS/ContainerInsights" and running["Metric"]["MetricName"] == "RunningTaskCount"
    assert {d["Name"]: d["Value"] for d in running["Metric"]["Dimensions"]} == {
        "ClusterName": REFS["Cluster"], "ServiceName": ATTRIBUTES["Service.Name"]}
    # RunningTaskCount exists only with Container Insights on the cluster
    settings = resources["Cluster"]["Properties"]["ClusterSettings"]
    assert {"Name": "containerInsights", "Value": "enabled"} in settings


def test_a_stop_fits_the_stop_timeout(template):
    parameters = template["Parameters"]
    poller = container(template)
    assert int(poller["StopTimeout"]) == parameters["StopTimeout"]["Default"]
    assert int(parameters["StopTimeout"]["MaxValue"]) <= 120  # Fargate's limit
    assert poller["LinuxParameters"]["InitProcessEnabled"] is True  # SIGTERM reaches the poller, zombies reaped
    # the receive running ahead is waited for on stop: the longest poll fits in the shortest stop timeout
    assert int(parameters["PollWaitSeconds"]["MaxValue"]) < int(parameters["StopTimeout"]["MinValue"])
    command = poller["Command"]
    assert int(command[command.index("--wait-seconds") + 1]) == parameters["PollWaitSeconds"]["Default"]


def test_logs_go_to_the_stacks_log_group(template):
    poller = container(template)
    assert poller["LogConfiguration"] == {"LogDriver": "awslogs", "Options": {
        "awslogs-group": REFS["PollerLogGroup"], "awslogs-region": REGION, "awslogs-stream-prefix": "poller"}}
    group = resolver(template, LogRetentionInDays="14")(template["Resources"]["PollerLogGroup"]["Properties"])
    assert group == {"LogGroupName": f"/ecs/{STACK}-poller", "RetentionInDays": "14"}


def test_the_security_group_lets_nothing_in(template):
    group = template["Resources"]["TaskSecurityGroup"]["Properties"]
    assert "SecurityGroupIngress" not in group
    assert [(r["IpProtocol"], r["FromPort"], r["ToPort"]) for r in group["SecurityGroupEgress"]] == [("tcp", 443, 443)]


# ----------------------------------------------------------------------------- moto


MOTO_SKIPS = {"ScalableTarget", "BacklogPerTaskPolicy"}  # moto's CloudFormation has no Application Auto Scaling


def test_moto_deploys_the_service_and_takes_its_scaling_policy(template, moto_server):
    ec2, cfn = boto3.client("ec2"), boto3.client("cloudformation")
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    parameters = {**REQUIRED, "VpcId": vpc, "Subnets": subnet, "TrustedKmsKeyArn": KMS_KEY}
    stack_id = cfn.create_stack(StackName=STACK, TemplateBody=json.dumps(template), Capabilities=["CAPABILITY_IAM"],
                                Parameters=[{"ParameterKey": k, "ParameterValue": v}
                                            for k, v in parameters.items()])["StackId"]
    stack = cfn.describe_stacks(StackName=stack_id)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    resources = {r["LogicalResourceId"]: r for r in cfn.list_stack_resources(StackName=stack_id)["StackResourceSummaries"]}
    created = {k for k, r in resources.items() if r["ResourceStatus"] == "CREATE_COMPLETE" and r.get("PhysicalResourceId")}
    assert set(template["Resources"]) - created <= MOTO_SKIPS
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}

    ecs = boto3.client("ecs")
    (service,) = ecs.describe_services(cluster=outputs["ClusterName"], services=[outputs["ServiceName"]])["services"]
    # (moto's CloudFormation drops the launch type, the task's cpu, network mode and compatibilities:
    # those are checked on the template above)
    definition = ecs.describe_task_definition(taskDefinition=service["taskDefinition"])["taskDefinition"]
    assert definition["memory"] == "2048"
    (poller,) = definition["containerDefinitions"]
    assert poller["entryPoint"] == ["dogbreeds-worker"] and poller["command"][0] == "run"
    assert poller["stopTimeout"] == 120 and poller["linuxParameters"] == {"initProcessEnabled": True}
    assert poller["logConfiguration"] == {"logDriver": "awslogs", "options": {
        "awslogs-group": outputs["LogGroupName"], "awslogs-region": REGION, "awslogs-stream-prefix": "poller"}}
    deployed_environment = {e["name"]: e["value"] for e in poller["environment"]}
    assert deployed_environment["DOGBREEDS_QUEUE_URL"].endswith(f"/{ACCOUNT}/{REQUIRED['QueueName']}")
    assert deployed_environment["DOGBREEDS_MODEL"] == MODEL_URI
    assert deployed_environment["DOGBREEDS_TRUSTED_KEY"] == f"kms://{KMS_KEY}"
    assert not deployed_environment.get("DOGBREEDS_MODEL_DIGEST")

    # what moto's CloudFormation skips, put through the API with the template's own properties
    autoscaling = boto3.client("application-autoscaling")
    refs = {**REFS, "Cluster": outputs["ClusterName"], "PollerLogGroup": outputs["LogGroupName"]}
    resolve = Resolver(template, parameters, pseudo=PSEUDO, refs=refs,
                       attributes={**ATTRIBUTES, "Service.Name": outputs["ServiceName"]})
    target = resolve(template["Resources"]["ScalableTarget"]["Properties"])
    autoscaling.register_scalable_target(**{k: int(v) if k.endswith("Capacity") else v for k, v in target.items()})
    policy = resolve(template["Resources"]["BacklogPerTaskPolicy"]["Properties"])
    configuration = policy["TargetTrackingScalingPolicyConfiguration"]
    configuration.update(TargetValue=float(configuration["TargetValue"]),
                         ScaleInCooldown=int(configuration["ScaleInCooldown"]),
                         ScaleOutCooldown=int(configuration["ScaleOutCooldown"]))
    autoscaling.put_scaling_policy(PolicyName=policy["PolicyName"], ServiceNamespace="ecs",
                                   ResourceId=target["ResourceId"], ScalableDimension=target["ScalableDimension"],
                                   PolicyType=policy["PolicyType"], TargetTrackingScalingPolicyConfiguration=configuration)
    (stored,) = autoscaling.describe_scaling_policies(ServiceNamespace="ecs")["ScalingPolicies"]
    assert stored["ResourceId"] == f"service/{outputs['ClusterName']}/{outputs['ServiceName']}"
    assert stored["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 600


# ----------------------------------------------------------------------------- the container's command, run


def test_the_containers_command_drains_a_queue_and_stops_cleanly_on_sigterm(template, moto_server, colour_artifact):
    """The command and environment of the task definition (resolved for a 1 s poll), pointed at moto:
    on SIGTERM mid-run it exits 0 well within the stop timeout, with every message either done
    (deleted, its manifest written) or handed back (visible): none left in flight, none lost."""
    from infra.local_stack import create_stack
    from tests.conftest import COLOUR_BREEDS, colour_photo

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    stack = create_stack(s3, sqs, bucket="acme-dog-photos", queue="dogbreeds-PhotoQueue-ABC")
    sqs.purge_queue(QueueUrl=stack.queue_url)  # the s3:TestEvent
    keys = []
    for i in range(60):
        folder = list(COLOUR_BREEDS)[i % 3]
        key = f"incoming/{folder}/{i:03d}.jpg"
        s3.put_object(Bucket=stack.bucket, Key=key, Body=colour_photo(COLOUR_BREEDS[folder], seed=i))
        keys.append(key)
    poller = container(template, PollWaitSeconds="1")
    env = {**os.environ, **{v["Name"]: str(v["Value"]) for v in poller["Environment"]},
           "DOGBREEDS_MODEL": str(colour_artifact), "DOGBREEDS_QUEUE_URL": stack.queue_url,
           "DOGBREEDS_CACHE": str(Path(colour_artifact).parent / "cache"), "DOGBREEDS_BATCH_SIZE": "4"}
    command = [str(Path(sys.executable).with_name(poller["EntryPoint"][0])), *poller["Command"]]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not s3.list_objects_v2(Bucket=stack.bucket, Prefix="manifests/").get("KeyCount"):
            assert process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.2)
        stopped = time.time()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=int(poller["StopTimeout"]))
        stop_seconds = time.time() - stopped
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert stop_seconds < int(poller["StopTimeout"])
    assert "stop requested" in out + err
    assert "serving an unverified model" in out + err  # no trusted key in the template's defaults
    attributes = sqs.get_queue_attributes(QueueUrl=stack.queue_url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    assert int(attributes["ApproximateNumberOfMessagesNotVisible"]) == 0  # nothing left hidden in flight
    done = {item["key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix="manifests/")
            for obj in page.get("Contents", [])
            for item in json.loads(s3.get_object(Bucket=stack.bucket, Key=obj["Key"])["Body"].read())["items"]}
    assert done and done <= set(keys)
    assert len(done) + int(attributes["ApproximateNumberOfMessages"]) == len(keys)  # done or back in the queue

"""infra/template.yaml as plain CloudFormation, offline, for the checks in tests/.

``translate()`` runs samtranslator's ``transform`` (package ``aws-sam-translator``) with a
managed-policy loader that knows no AWS managed policy: the template must not use one (they
are broad; the worker's role is spelled out). The image function gets a placeholder ImageUri,
as ``sam validate`` does (``sam build`` fills in the real one). Where the running Python has no
samtranslator, this file runs itself under the tools venv (.venv-tools, made by infra/check.sh;
or $DOGBREEDS_TOOLS_VENV) and hands back JSON.

``Resolver`` evaluates the intrinsic functions the template uses (Ref, Fn::Sub, Fn::GetAtt,
Fn::If and the condition functions, Fn::FindInMap, Fn::Join, Fn::Split, Fn::Select) for given parameter values, so
tests can read the IAM policies and the notification rules as AWS would see them.

Standalone (stdlib + samtranslator only), so that it can run in either venv:
    python infra/sam_translate.py [template.yaml]  ->  the translated template as JSON
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("template.yaml")
ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER_IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dogbreeds-worker:latest"
NO_VALUE = object()
PSEUDO_PARAMETERS = {"AWS::AccountId": "123456789012", "AWS::Region": "us-east-1", "AWS::Partition": "aws",
                     "AWS::StackName": "dogbreeds", "AWS::URLSuffix": "amazonaws.com", "AWS::NoValue": NO_VALUE}


class TranslatorUnavailable(RuntimeError):
    """Neither this Python nor the tools venv has samtranslator."""


class NoManagedPolicies:
    """A managed-policy loader stub: the template may name no AWS managed policy."""

    def load(self) -> dict[str, str]:
        return {}


def tools_python() -> Path:
    venv = Path(os.environ.get("DOGBREEDS_TOOLS_VENV") or ROOT / ".venv-tools")
    return venv / "bin" / "python"


def translate(template: Path = TEMPLATE, *, image_uri: str = PLACEHOLDER_IMAGE_URI, region: str = "us-east-1") -> dict:
    """The SAM template transformed to CloudFormation (a dict)."""
    try:
        import samtranslator  # noqa: F401
    except ImportError:
        python = tools_python()
        if not python.exists():
            raise TranslatorUnavailable(
                "samtranslator is not installed here (package aws-sam-translator) and there is no tools venv at "
                f"{python.parents[1]} (infra/check.sh venv makes it)") from None
        done = subprocess.run([str(python), __file__, str(template), "--image-uri", image_uri],
                              capture_output=True, text=True, env={**os.environ, "AWS_DEFAULT_REGION": region})
        if done.returncode != 0:
            raise RuntimeError(f"samtranslator failed in {python}:\n{done.stderr[-4000:]}") from None
        return json.loads(done.stdout)
    return _translate_here(template, image_uri=image_uri, region=region)


def _translate_here(template: Path, *, image_uri: str, region: str) -> dict:
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    document = yaml_parse(Path(template).read_text())
    for resource in document.get("Resources", {}).values():
        properties = resource.get("Properties", {})
        if (resource.get("Type") == "AWS::Serverless::Function" and properties.get("PackageType") == "Image"
                and "ImageUri" not in properties):
            properties["ImageUri"] = image_uri
    with _region(region):
        return json.loads(json.dumps(transform(document, {}, NoManagedPolicies())))


@contextlib.contextmanager
def _region(region: str):
    """samtranslator reads the region (for ARNs) from boto3's session: the environment."""
    saved = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = saved or region
    try:
        yield
    finally:
        if saved is None:
            del os.environ["AWS_DEFAULT_REGION"]


class UnresolvedReference(KeyError):
    pass


class Resolver:
    """Evaluates the template's intrinsic functions for given parameters.

    ``refs`` gives the physical id (``Ref``) of resources and ``attributes`` their
    ``Fn::GetAtt`` values, keyed ``"Logical.Attribute"``. A bucket with a BucketName property
    resolves by itself (Ref and Arn)."""

    def __init__(self, template: dict, parameters: dict | None = None, *, pseudo: dict | None = None,
                 refs: dict | None = None, attributes: dict | None = None):
        self.template = template
        defaults = {name: str(spec["Default"]) for name, spec in template.get("Parameters", {}).items()
                    if "Default" in spec}
        unknown = set(parameters or {}) - set(template.get("Parameters", {}))
        if unknown:
            raise ValueError(f"no such parameters: {sorted(unknown)}")
        self.values = {**PSEUDO_PARAMETERS, **(pseudo or {}), **defaults,
                       **{k: str(v) for k, v in (parameters or {}).items()}}
        self.refs = dict(refs or {})
        self.attributes = dict(attributes or {})

    def __call__(self, value):
        if isinstance(value, list):
            return [v for v in (self(item) for item in value) if v is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), = value.items()
            handler = self._FUNCTIONS.get(key)
            if handler is not None:
                return handler(self, argument)
        return {k: r for k, r in ((k, self(v)) for k, v in value.items()) if r is not NO_VALUE}

    def condition(self, name: str) -> bool:
        return bool(self(self.template["Conditions"][name]))

    def _ref(self, name):
        if name in self.values:
            return self.values[name]
        if name in self.refs:
            return self.refs[name]
        resource = self.template.get("Resources", {}).get(name)
        if resource and resource["Type"] == "AWS::S3::Bucket" and "BucketName" in resource.get("Properties", {}):
            return self(resource["Properties"]["BucketName"])
        raise UnresolvedReference(f"Ref {name}: give its physical id in refs=")

    def _get_att(self, argument):
        logical, attribute = argument.split(".", 1) if isinstance(argument, str) else argument
        key = f"{logical}.{attribute}"
        if key in self.attributes:
            return self.attributes[key]
        resource = self.template.get("Resources", {}).get(logical, {})
        if resource.get("Type") == "AWS::S3::Bucket" and attribute == "Arn":
            return f"arn:{self.values['AWS::Partition']}:s3:::{self._ref(logical)}"
        raise UnresolvedReference(f"Fn::GetAtt {key}: give it in attributes=")

    def _sub(self, argument):
        text, variables = (argument, {}) if isinstance(argument, str) else (argument[0], self(argument[1]))

        def replace(match):
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in variables:
                return str(variables[name])
            if "." in name and name.split(".", 1)[0] in self.template.get("Resources", {}):
                return str(self._get_att(name))
            return str(self._ref(name))

        return re.sub(r"\$\{([^}]+)\}", replace, text)

    def _if(self, argument):
        name, when_true, when_false = argument
        return self(when_true) if self.condition(name) else self(when_false)

    def _find_in_map(self, argument):
        mapping, key, attribute = (str(self(a)) for a in argument)
        return self.template["Mappings"][mapping][key][attribute]

    def _join(self, argument):
        separator, items = argument
        return separator.join(str(i) for i in self(items))

    _FUNCTIONS = {
        "Ref": _ref,
        "Fn::GetAtt": _get_att,
        "Fn::Sub": _sub,
        "Fn::If": _if,
        "Fn::FindInMap": _find_in_map,
        "Fn::Join": _join,
        "Fn::Split": lambda self, a: str(self(a[1])).split(str(self(a[0]))),
        "Fn::Select": lambda self, a: self(a[1])[int(self(a[0]))],
        "Fn::Equals": lambda self, a: self(a[0]) == self(a[1]),
        "Fn::Not": lambda self, a: not self(a[0]),
        "Fn::And": lambda self, a: all(self(c) for c in a),
        "Fn::Or": lambda self, a: any(self(c) for c in a),
        "Condition": lambda self, a: self.condition(a),
    }


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("template", nargs="?", default=str(TEMPLATE))
    parser.add_argument("--image-uri", default=PLACEHOLDER_IMAGE_URI)
    args = parser.parse_args(argv)
    json.dump(_translate_here(Path(args.template), image_uri=args.image_uri,
                              region=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"), sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

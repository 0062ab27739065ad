"""Least privilege, checked on the CloudFormation template (run by .ci/run after cfn-lint):
no IAM statement grants `kinesis:*` or `dynamodb:*`, only `kinesis:ListStreams` (which has no
resource-level permissions) may use `Resource: "*"`, a trust policy that lets another account's
principal assume a role requires an external id, and a resource policy (a stream shared with the
replicator) names its principal: never everyone.

    python3 deploy/checks/least_privilege.py deploy/cloudformation/kinesis-fanout.yaml
"""

import sys

from cfnlint.decode import decode


def statements(node):
    """Every IAM statement in the template, including those inside Fn::If branches."""
    if isinstance(node, dict):
        if "Effect" in node and "Action" in node:
            yield node
        for value in node.values():
            yield from statements(value)
    elif isinstance(node, list):
        for value in node:
            yield from statements(value)


def as_list(value):
    return value if isinstance(value, list) else [value]


template, problems = decode(sys.argv[1])
if problems:
    sys.exit("cannot parse %s: %s" % (sys.argv[1], problems))
checked = 0
failures = []
for statement in statements(template.get("Resources", {})):
    checked += 1
    actions = [a for a in as_list(statement["Action"]) if isinstance(a, str)]
    resources = as_list(statement.get("Resource", []))
    for action in actions:
        if action.endswith(":*") or action == "*":
            failures.append("statement %s grants %s" % (statement.get("Sid", "?"), action))
    if "*" in resources and set(actions) - {"kinesis:ListStreams"}:
        failures.append("statement %s grants %s on every resource" % (statement.get("Sid", "?"), actions))
    principal = statement.get("Principal", {})
    if principal == "*" or (isinstance(principal, dict) and "*" in as_list(principal.get("AWS", []))):
        failures.append("statement %s grants to every principal" % statement.get("Sid", "?"))
    if "sts:AssumeRole" in actions and isinstance(principal, dict) and "AWS" in principal:
        condition = statement.get("Condition", {}).get("StringEquals", {})
        if "sts:ExternalId" not in condition:
            failures.append("statement %s lets another account assume the role without an external id" % statement.get("Sid", "?"))
if failures:
    sys.exit("\n".join(failures))
print("least privilege: %d IAM statements checked, none too broad" % checked)

"""Static checks of the Terraform under ``infra/terraform`` (offline: no terraform binary).

The ``aws`` autoscaler provider (:mod:`control_plane.autoscaler.providers.aws`) finds a pool's
Auto Scaling group by two tags, drains instances through one termination lifecycle hook and
relies on the boot script to start the worker with a given environment; its constants are
imported here, never restated, so a change on either side fails these tests. Without a
terraform binary (``terraform validate`` needs the provider from the registry) the files are
parsed with python-hcl2, and references, module arguments and template variables are
resolved here; checkov, where it is importable, scans the whole tree.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest

from control_plane.autoscaler.providers.aws import BOOT_ENV, LIFECYCLE_HOOK, NAMESPACE_TAG, POOL_TAG
from mnemos.permissions import ROLES

ROOT = Path(__file__).resolve().parents[1]
TF = ROOT / "infra" / "terraform"
MODULES = TF / "modules"
WORKER_POOL = MODULES / "gpu-worker-pool"
NATS_CLUSTER = MODULES / "nats-cluster"
CONTROL_PLANE = MODULES / "control-plane"
EXAMPLE = TF / "examples" / "gpu-cluster"
CONFIG_DIRS = [WORKER_POOL, NATS_CLUSTER, CONTROL_PLANE, EXAMPLE]
TF_FILES = sorted(p for p in TF.rglob("*.tf") if ".terraform" not in p.relative_to(TF).parts)

#: What the autoscaler does to a group (providers/aws.py); only ever on its namespace's groups.
MUTATING_ACTIONS = (
    "autoscaling:SetDesiredCapacity",
    "autoscaling:TerminateInstanceInAutoScalingGroup",
    "autoscaling:SetInstanceProtection",
    "autoscaling:CompleteLifecycleAction",
    "autoscaling:RecordLifecycleActionHeartbeat",
)
#: The roles whose containers the control-plane module runs (`mnemos <role>`), each as its own
#: NATS user: role -> its key in the module's nats_creds_secret_arns.
CONTROL_PLANE_ROLES = {"control-plane": "control_plane", "gateway": "gateway", "autoscaler": "autoscaler"}
#: Arguments of a module call that are not variables of the module.
META_ARGUMENTS = {"source", "version", "providers", "count", "for_each", "depends_on"}


# ----------------------------------------------------------------------------- parsing


def _norm(value: Any) -> Any:
    """python-hcl2 >= 7 keeps the quotes of string literals and labels and marks blocks with
    ``__is_block__`` (and comments inside a block with ``__comments__``); older versions do
    neither. Give both the same shape: plain strings, expressions as ``${...}``, no markers."""
    if isinstance(value, dict):
        return {_norm(k): _norm(v) for k, v in value.items() if k not in ("__is_block__", "__comments__")}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


#: checkov depends on bc-python-hcl2, a fork that installs the same ``hcl2`` package (and
#: ``bin/hcl2tojson``) as python-hcl2 with another output shape: installed into the same
#: environment it silently replaces the parser these tests are written for.
_HCL2_PROBLEM = (
    None if _norm(hcl2.loads('a = "x"\n')) == {"a": "x"}
    else f"`import hcl2` is not python-hcl2 ({hcl2.__file__}); was checkov's bc-python-hcl2 installed over it?"
)


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    assert _HCL2_PROBLEM is None, _HCL2_PROBLEM
    with path.open() as f:
        return _norm(hcl2.load(f))


def _blocks(directory: Path, kind: str) -> list[Any]:
    """Every ``kind`` block (resource, variable, ...) of a configuration directory."""
    found: list[Any] = []
    for path in sorted(directory.glob("*.tf")):
        found.extend(_load(path).get(kind, []))
    return found


def _resources(directory: Path, kind: str = "resource") -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for block in _blocks(directory, kind):
        for rtype, named in block.items():
            for name, body in named.items():
                out[(rtype, name)] = body
    return out


def _named(directory: Path, kind: str) -> dict[str, dict[str, Any]]:
    """Blocks with one label: variable, output, module."""
    out: dict[str, dict[str, Any]] = {}
    for block in _blocks(directory, kind):
        out.update(block)
    return out


def _locals(directory: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for block in _blocks(directory, "locals"):
        out.update(block)
    return out


def _nested(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The ``name`` blocks of a body, static and the content of ``dynamic "name"`` blocks."""
    found = list(body.get(name, []))
    for dyn in body.get("dynamic", []):
        if name in dyn:
            found.extend(dyn[name].get("content", []))
    return found


def _source(directory: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(directory.glob("*.tf")))


def _resolve_local(directory: Path, expr: Any) -> str:
    """``${local.x}`` -> the expression of local x (once), else the expression itself."""
    text = str(expr)
    m = re.fullmatch(r"\$\{local\.(\w+)\}", text)
    if m:
        return str(_locals(directory)[m.group(1)])
    return text


def _only_group(directory: Path) -> dict[str, Any]:
    groups = [b for (t, _), b in _resources(directory).items() if t == "aws_autoscaling_group"]
    assert len(groups) == 1, f"expected one aws_autoscaling_group in {directory.name}, found {len(groups)}"
    return groups[0]


# ----------------------------------------------------------------------------- files


def test_hcl2_is_python_hcl2() -> None:
    assert _HCL2_PROBLEM is None, _HCL2_PROBLEM


def test_terraform_tree_is_there() -> None:
    names = {p.relative_to(TF).as_posix() for p in TF_FILES}
    for d in CONFIG_DIRS:
        for f in ("versions.tf", "variables.tf", "main.tf", "outputs.tf"):
            assert f"{d.relative_to(TF).as_posix()}/{f}" in names
    assert (TF / "README.md").is_file()


@pytest.mark.parametrize("path", TF_FILES, ids=[p.relative_to(TF).as_posix() for p in TF_FILES])
def test_every_tf_file_parses(path: Path) -> None:
    with path.open() as f:
        parsed = hcl2.load(f)
    assert isinstance(parsed, dict) and parsed, f"{path} parsed to nothing"


@pytest.mark.parametrize("directory", CONFIG_DIRS, ids=lambda d: d.name)
def test_versions_are_pinned(directory: Path) -> None:
    (terraform,) = _load(directory / "versions.tf")["terraform"]
    assert re.fullmatch(r">= ?1\.([5-9]|\d\d)(\.\d+)?", terraform["required_version"])
    (providers,) = terraform["required_providers"]
    aws = providers["aws"]
    assert aws["source"] == "hashicorp/aws"
    assert re.fullmatch(r"~> ?5\.\d+", aws["version"]), aws["version"]


@pytest.mark.parametrize("directory", CONFIG_DIRS, ids=lambda d: d.name)
def test_every_variable_has_a_description_and_a_type(directory: Path) -> None:
    variables = _named(directory, "variable")
    assert variables
    for name, body in variables.items():
        assert str(body.get("description", "")).strip(), f"{directory.name}: variable {name} has no description"
        assert body.get("type"), f"{directory.name}: variable {name} has no type"
    for name, body in _named(directory, "output").items():
        assert str(body.get("description", "")).strip(), f"{directory.name}: output {name} has no description"


# ----------------------------------------------------------------------------- worker pool contract


def test_worker_group_carries_the_pool_and_namespace_tags() -> None:
    tags = {t["key"]: t for t in _only_group(WORKER_POOL).get("tag", [])}
    assert POOL_TAG in tags, f"the group has no static {POOL_TAG!r} tag"
    assert NAMESPACE_TAG in tags, f"the group has no static {NAMESPACE_TAG!r} tag"
    assert tags[POOL_TAG]["value"] == "${var.name}"
    assert tags[NAMESPACE_TAG]["value"] == "${var.namespace}"
    for key in (POOL_TAG, NAMESPACE_TAG):
        assert tags[key]["propagate_at_launch"] is True, f"{key} must propagate to the instances"


def test_worker_group_has_the_drain_lifecycle_hook() -> None:
    group = _only_group(WORKER_POOL)
    hooks = [b for (t, _), b in _resources(WORKER_POOL).items() if t == "aws_autoscaling_lifecycle_hook"]
    hooks += _nested(group, "initial_lifecycle_hook")
    drain = [h for h in hooks if h.get("name") == LIFECYCLE_HOOK]
    names = [h.get("name") for h in hooks]
    assert len(drain) == 1, f"expected one lifecycle hook named {LIFECYCLE_HOOK!r}, found {names}"
    (hook,) = drain
    assert hook["lifecycle_transition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["default_result"] == "CONTINUE"
    assert "var." in str(hook["heartbeat_timeout"])
    assert "count" not in hook and "for_each" not in hook, "the drain hook must always exist"
    if "autoscaling_group_name" in hook:
        assert hook["autoscaling_group_name"] == "${aws_autoscaling_group.pool.name}"


def test_only_the_autoscaler_scales_worker_groups() -> None:
    group = _only_group(WORKER_POOL)
    assert group["protect_from_scale_in"] is True
    (lifecycle,) = group["lifecycle"]
    ignored = [re.sub(r"^\$\{(.*)\}$", r"\1", str(a)) for a in lifecycle["ignore_changes"]]
    assert "desired_capacity" in ignored
    for directory in CONFIG_DIRS:
        for rtype, name in _resources(directory):
            assert not rtype.startswith(("aws_autoscaling_policy", "aws_autoscaling_schedule", "aws_appautoscaling")), (
                f"{directory.name}: {rtype}.{name} would scale against the autoscaler")
    # AZRebalance would move workers behind the autoscaler's back.
    assert "AZRebalance" in _named(WORKER_POOL, "variable")["suspended_processes"]["default"]


def test_worker_group_capacity_types() -> None:
    variables = _named(WORKER_POOL, "variable")
    validation = str(variables["capacity_type"]["validation"])
    assert re.search(r"[\"']on-demand[\"']", validation) and re.search(r"[\"']spot[\"']", validation)
    assert variables["capacity_type"]["default"] == "on-demand"
    group = _only_group(WORKER_POOL)
    rebalance = _resolve_local(WORKER_POOL, group["capacity_rebalance"])
    assert re.search(r"var\.capacity_type\s*==\s*[\"']spot[\"']", rebalance), rebalance
    dynamic = {name for d in group.get("dynamic", []) for name in d}
    assert {"mixed_instances_policy", "warm_pool", "launch_template"} <= dynamic
    mixed = _resolve_local(WORKER_POOL, "${local.use_mixed_instances}")
    assert "local.is_spot" in mixed or "spot" in mixed
    (lifecycle,) = group["lifecycle"]
    preconditions = " ".join(str(p["condition"]) for p in lifecycle["precondition"])
    assert re.search(r"var\.capacity_type == [\"']on-demand[\"']", preconditions), "a warm pool is for on-demand groups"


def test_worker_launch_template() -> None:
    (template,) = [b for (t, _), b in _resources(WORKER_POOL).items() if t == "aws_launch_template"]
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required", "IMDSv2 must be required"
    (nic,) = template["network_interfaces"]
    assert nic["associate_public_ip_address"] == "${var.associate_public_ip_address}"
    variables = _named(WORKER_POOL, "variable")
    assert variables["associate_public_ip_address"]["default"] is False
    for mapping in template["block_device_mappings"]:
        for ebs in mapping["ebs"]:
            assert ebs["encrypted"] is True
    assert "templates/boot.sh.tftpl" in template["user_data"]
    assert "local.boot_vars" in template["user_data"]
    assert "aws_ssm_parameter" in str(_resources(WORKER_POOL, "data"))


def _shell_continued(text: str) -> list[str]:
    """Lines of a shell script with backslash continuations joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def test_boot_script_starts_the_worker_with_the_boot_env() -> None:
    script = (WORKER_POOL / "templates" / "boot.sh.tftpl").read_text()
    runs = [line for line in _shell_continued(script)
            if re.search(r"\bdocker run\b", line) and not line.lstrip().startswith("#")]
    assert len(runs) == 1, runs
    (run,) = runs
    env = dict(re.findall(r"(?:-e|--env)\s+[\"']?([A-Z_][A-Z0-9_]*)=(\S*)", run))
    for name in BOOT_ENV:
        assert name in env, f"the worker container does not get {name}"
    assert "--gpus all" in run
    assert re.search(r'"\$IMAGE" worker\b', run), "the container must run `mnemos worker` (the image's entrypoint)"

    def assigned(var: str) -> str:
        m = re.search(rf"^{var}=(.+)$", script, re.M)
        assert m, f"the boot script never sets {var}"
        return m.group(1)

    # MNEMOS_WORKER_ID: the instance id, from IMDSv2 (a session token first).
    worker_id = re.fullmatch(r'"?\$(\w+)"?', env["MNEMOS_WORKER_ID"])
    assert worker_id, env["MNEMOS_WORKER_ID"]
    assert "meta-data/instance-id" in assigned(worker_id.group(1))
    assert re.search(r"curl [^\n]*-X PUT [^\n]*latest/api/token", script)
    assert "X-aws-ec2-metadata-token:" in script
    # MNEMOS_WORKER_TAGS: "pool=<the pool's name>,provider=aws".
    tags = re.fullmatch(r'"?pool=\$(\w+),provider=aws"?', env["MNEMOS_WORKER_TAGS"])
    assert tags, env["MNEMOS_WORKER_TAGS"]
    pool_var = re.search(r"\$\{[^}]*\b(\w+)\b", assigned(tags.group(1)).replace("replace(", ""))
    assert pool_var and pool_var.group(1) == "pool_name"
    boot_vars = _locals(WORKER_POOL)["boot_vars"]
    assert boot_vars["pool_name"] == "${var.name}"
    assert boot_vars["namespace"] == "${var.namespace}"
    assert boot_vars["nats_url"] == "${var.nats_url}"
    # MNEMOS_NATS_CREDS: a file mounted into the container, fetched from the secret.
    creds = env["MNEMOS_NATS_CREDS"].strip("\"'")
    assert re.search(rf"-v \S+:{re.escape(creds)}:ro", run), "the credentials file is not mounted at MNEMOS_NATS_CREDS"
    assert "secretsmanager get-secret-value" in script
    assert boot_vars["nats_creds_secret_arn"] == "${var.nats_creds_secret_arn}"


def test_worker_role_reads_only_its_secret() -> None:
    doc = _resources(WORKER_POOL, "data")[("aws_iam_policy_document", "worker")]
    statements = _nested(doc, "statement")
    secret = [s for s in statements if "secretsmanager:GetSecretValue" in s["actions"]]
    assert [s["resources"] for s in secret] == [["${var.nats_creds_secret_arn}"]]
    for s in statements:
        for action in s["actions"]:
            assert "*" not in action, f"wildcard action {action} in the worker role"


# ----------------------------------------------------------------------------- templates


def _template_expressions(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inner) of every ``${...}`` and ``%{...}`` in a Terraform template
    (``$${`` and ``%%{`` are escapes), with nested braces and strings."""
    out = []
    i = 0
    while i < len(text) - 1:
        if text[i] in "$%" and text[i + 1] == "{":
            if i > 0 and text[i - 1] == text[i]:  # $${ / %%{: literal
                i += 2
                continue
            depth, j, in_string = 1, i + 2, False
            while depth:
                c = text[j]
                if in_string:
                    if c == "\\":
                        j += 1
                    elif c == '"':
                        in_string = False
                elif c == '"':
                    in_string = True
                elif c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                j += 1
            out.append((i, j, text[i + 2 : j - 1]))
            i = j
        else:
            i += 1
    return out


_TEMPLATE_KEYWORDS = {"for", "in", "if", "else", "endif", "endfor", "true", "false", "null"}


def _template_names(text: str) -> set[str]:
    """Top-level names a template interpolates (not functions, attributes or loop variables)."""
    names: set[str] = set()
    loop_vars: set[str] = set()
    for _, _, inner in _template_expressions(text):
        inner = re.sub(r'"(?:[^"\\]|\\.)*"', '""', inner.strip("~ \n"))
        m = re.match(r"for\s+(\w+)(?:\s*,\s*(\w+))?\s+in\s+(.*)$", inner, re.S)
        if m:
            loop_vars.update(v for v in m.group(1, 2) if v)
            inner = m.group(3)
        inner = re.sub(r"^if\s+", "", inner)
        for tok in re.finditer(r"(?<![\w.])([A-Za-z_]\w*)\b(?!\s*\()", inner):
            names.add(tok.group(1))
    return names - loop_vars - _TEMPLATE_KEYWORDS


def _templatefile_calls(directory: Path) -> list[tuple[str, set[str]]]:
    """(template file name, keys of the variables passed) of every templatefile() call."""
    source = _source(directory)
    calls = []
    for m in re.finditer(r'templatefile\("\$\{path\.module\}/templates/([\w.-]+)",\s*', source):
        rest = source[m.end() :]
        ref = re.match(r"local\.(\w+)", rest)
        if ref:
            calls.append((m.group(1), set(_locals(directory)[ref.group(1)])))
            continue
        assert rest.startswith("{"), f"{directory.name}: templatefile({m.group(1)}) needs a map or a local"
        keys, depth = set(), 0
        for line in rest.splitlines():
            if depth == 1:
                k = re.match(r"\s*(\w+)\s*=", line)
                if k:
                    keys.add(k.group(1))
            depth += sum(line.count(c) for c in "{([") - sum(line.count(c) for c in "})]")
            if depth <= 0:
                break
        calls.append((m.group(1), keys))
    return calls


@pytest.mark.parametrize("directory", [WORKER_POOL, NATS_CLUSTER, CONTROL_PLANE], ids=lambda d: d.name)
def test_templates_get_exactly_their_variables(directory: Path) -> None:
    calls = _templatefile_calls(directory)
    templates = sorted(p.name for p in (directory / "templates").iterdir())
    assert sorted({name for name, _ in calls}) == templates, "every template is rendered, and only those"
    for name, passed in calls:
        used = _template_names((directory / "templates" / name).read_text())
        assert used <= passed, f"{directory.name}/{name} uses {sorted(used - passed)}, not passed by templatefile()"
        assert passed <= used, f"{directory.name}/{name} is passed {sorted(passed - used)}, which it never uses"


def _render_roughly(text: str) -> str:
    """A template with every directive dropped and every interpolation replaced by a word:
    enough for ``bash -n``."""
    out, last = [], 0
    for start, end, inner in _template_expressions(text):
        out.append(text[last:start])
        out.append("" if text[start] == "%" else "X")
        last = end
        if inner.endswith("~") and text[start] == "%" and text[end : end + 1] == "\n":
            last += 1
    out.append(text[last:])
    return "".join(out).replace("$${", "${").replace("%%{", "%{")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize("script", sorted(MODULES.glob("*/templates/*.sh.tftpl")),
                         ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_boot_scripts_are_valid_shell(script: Path, tmp_path: Path) -> None:
    rendered = _render_roughly(script.read_text())
    pieces = [rendered]
    # Scripts the boot script writes through quoted heredocs are not parsed with it: check each.
    for m in re.finditer(r"<<'(\w+)'\n(.*?)\n\1\n", rendered, re.S):
        if m.group(2).startswith("#!/bin/bash"):
            pieces.append(m.group(2))
    assert len(pieces) >= 2, "expected a start script written by the boot script"
    for i, piece in enumerate(pieces):
        path = tmp_path / f"piece{i}.sh"
        path.write_text(piece + "\n")
        done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert done.returncode == 0, f"{script.name} (part {i}): {done.stderr}"
        if shutil.which("shellcheck"):  # where it is installed; not a requirement
            done = subprocess.run(["shellcheck", "-S", "warning", "-s", "bash", str(path)],
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{script.name} (part {i}):\n{done.stdout}"


# ----------------------------------------------------------------------------- control plane


def _as_list(value: Any) -> list[Any]:
    """An attribute that is a list literal, or one expression (e.g. a for expression)."""
    return value if isinstance(value, list) else [value]


def _policy_statements(directory: Path) -> list[dict[str, Any]]:
    docs = [b for (t, n), b in _resources(directory, "data").items()
            if t == "aws_iam_policy_document" and n != "assume"]
    assert docs
    return [s for doc in docs for s in _nested(doc, "statement")]


def test_control_plane_policy_scopes_mutations_by_namespace_tag() -> None:
    statements = _policy_statements(CONTROL_PLANE)
    granted: set[str] = set()
    for s in statements:
        assert "not_actions" not in s and "not_resources" not in s
        assert s.get("effect", "Allow") == "Allow"
        actions = s["actions"]
        mutates = [a for a in MUTATING_ACTIONS if any(fnmatch.fnmatchcase(a, pattern) for pattern in actions)]
        if not mutates:
            continue
        granted.update(mutates)
        conditions = s.get("condition", [])
        scoped = [c for c in conditions
                  if c["test"] == "StringEquals"
                  and c["variable"] == f"aws:ResourceTag/{NAMESPACE_TAG}"
                  and c["values"] == ["${var.namespace}"]]
        assert scoped, f"statement {s.get('sid')} grants {mutates} without the {NAMESPACE_TAG} tag condition"
        assert all(a.startswith("autoscaling:") and "*" not in a for a in actions), (
            f"statement {s.get('sid')} mixes other or wildcard actions into the scoped ones: {actions}")
        assert "*" not in _as_list(s["resources"]), f"statement {s.get('sid')} is not scoped to group ARNs"
    assert granted == set(MUTATING_ACTIONS), f"missing: {sorted(set(MUTATING_ACTIONS) - granted)}"
    every = [a for s in statements for a in s["actions"]]
    assert "autoscaling:Describe*" in every
    assert "ec2:DescribeInstances" in every
    # The role must not be able to bring a group into its namespace.
    for a in ("autoscaling:CreateOrUpdateTags", "autoscaling:DeleteTags", "autoscaling:UpdateAutoScalingGroup"):
        assert not any(fnmatch.fnmatchcase(a, p) for p in every), f"the control plane may {a}"
    reads = [s for s in statements if "secretsmanager:GetSecretValue" in s["actions"]]
    assert reads and all("*" not in _as_list(s["resources"]) for s in reads)


def test_control_plane_group_is_outside_its_namespace() -> None:
    group = _only_group(CONTROL_PLANE)
    keys = {t["key"] for t in group.get("tag", [])}
    assert NAMESPACE_TAG not in keys and POOL_TAG not in keys, "its own role could resize the control plane"
    assert NAMESPACE_TAG in str(_named(CONTROL_PLANE, "variable")["tags"]["validation"])
    assert NAMESPACE_TAG not in str(_locals(CONTROL_PLANE)["tags"])


def test_control_plane_takes_one_creds_secret_per_role() -> None:
    assert set(CONTROL_PLANE_ROLES) <= set(ROLES), "a control-plane role is not a role of mnemos.permissions"
    variables = _named(CONTROL_PLANE, "variable")
    assert "nats_creds_secret_arn" not in variables, "one shared credentials secret for three roles"
    arns = variables["nats_creds_secret_arns"]
    assert "default" not in arns, "every role's secret is required"
    m = re.fullmatch(r"\$\{object\(\{(.*)\}\)\}", str(arns["type"]), re.S)
    assert m, arns["type"]
    fields = dict(re.findall(r"(\w+)\s*=\s*(\w+)", m.group(1)))
    assert fields == {key: "string" for key in CONTROL_PLANE_ROLES.values()}, fields
    for role in CONTROL_PLANE_ROLES:
        assert f"creds/{role}.creds" in arns["description"], f"the description does not name {role}'s file"
    boot_vars = _locals(CONTROL_PLANE)["boot_vars"]
    assert boot_vars["nats_creds_secret_arns"] == "${var.nats_creds_secret_arns}"
    # Each container's MNEMOS_NATS_CREDS is its own role's file; none is shared.
    assert "MNEMOS_NATS_CREDS" not in _locals(CONTROL_PLANE)["common_env"]
    for role, key in CONTROL_PLANE_ROLES.items():
        env = str(boot_vars[f"{key}_env"])
        creds = re.findall(r'MNEMOS_NATS_CREDS\s*=\s*"([^"]+)"', env)
        assert creds == [f"/run/secrets/mnemos/{role}.creds"], f"{role}: MNEMOS_NATS_CREDS {creds}"
        assert re.match(rf"\$\{{merge\(var\.{key}_env, local\.common_env, \{{[^}}]*MNEMOS_NATS_CREDS", env), (
            f"{role}: the module's MNEMOS_NATS_CREDS must come last, over {key}_env")
    calls = _named(EXAMPLE, "module")
    passed = calls["control_plane"]["nats_creds_secret_arns"]
    assert set(passed) == set(CONTROL_PLANE_ROLES.values())
    assert len(set(passed.values())) == 3, f"the example gives two roles one secret: {passed}"


def _start_script(values: dict[str, Any]) -> str:
    """The control plane's mnemos-start script as the boot script writes it, rendered with
    ``values`` (a dotted name resolves into nested dicts; ``replace(x, "'", ...)`` is the
    single-quote escape)."""
    text = (CONTROL_PLANE / "templates" / "boot.sh.tftpl").read_text()
    m = re.search(r"<<'MNEMOS_START'\n(.*?\n)MNEMOS_START\n", text, re.S)
    assert m, "the boot script does not write mnemos-start"
    body = m.group(1)
    out, last = [], 0
    for start, end, inner in _template_expressions(body):
        assert body[start] == "$", f"unexpected directive in mnemos-start: {inner}"
        call = re.fullmatch(r"replace\(([\w.]+),\s*\"'\",.*\)", inner.strip(), re.S)
        value: Any = values
        for part in (call.group(1) if call else inner.strip()).split("."):
            value = value[part]
        out += [body[last:start], str(value).replace("'", "'\\''") if call else str(value)]
        last = end
    out.append(body[last:])
    return "".join(out).replace("$${", "${")


_STUBS = {
    "curl": 'echo us-east-1\n',
    "chown": 'exit 0\n',
    "aws": 'printf "%s\\n" "$*" >> "$STUB_LOG"\n'
           'while [ $# -gt 0 ]; do [ "$1" = --secret-id ] && printf "SECRET %s\\n" "$2"; shift; done\n',
    "docker": 'if [ "$1" = run ]; then printf "%s\\n" "$@" > "$STUB_RUN"; fi\nexit 0\n',
}


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_control_plane_roles_get_only_their_own_creds(tmp_path: Path) -> None:
    """Run mnemos-start for each role with aws, docker and curl stubbed: it reads that role's
    secret only and mounts only that file, at that container's MNEMOS_NATS_CREDS."""
    arns = {key: f"arn:aws:secretsmanager:us-east-1:123456789012:secret:mnemos/{key}'s creds"
            for key in CONTROL_PLANE_ROLES.values()}
    api_keys_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:mnemos/gateway-keys"
    script = _start_script({
        "image": "mnemos:test", "nats_creds_secret_arns": arns, "gateway_api_keys_secret_arn": api_keys_arn,
        "ecr_registry": "", "ecr_region": "", "container_uid": os.getuid(), "gateway_port": 8080,
    })
    run_dir = tmp_path / "run"
    script = script.replace("/run/mnemos", str(run_dir))
    (tmp_path / "mnemos-start").write_text(script)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in _STUBS.items():
        (stubs / name).write_text("#!/bin/bash\n" + body)
        (stubs / name).chmod(0o755)
    # Only the start script's own creds mount: no fixed, shared credentials file.
    mounts = re.findall(r"-v\s+(\S+)", script)
    creds_mounts = [v for v in mounts if ".creds" in v]
    assert creds_mounts == [f'"{run_dir}/$ROLE.creds:/run/secrets/mnemos/$ROLE.creds:ro")'], creds_mounts
    assert "nats.creds" not in script
    for role, key in CONTROL_PLANE_ROLES.items():
        log, run = tmp_path / f"{role}.aws", tmp_path / f"{role}.run"
        env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log), "STUB_RUN": str(run)}
        done = subprocess.run(["bash", str(tmp_path / "mnemos-start"), role],
                              capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, f"{role}: {done.stderr}"
        read = re.findall(r"--secret-id (.*?) --query", log.read_text())
        expected = [arns[key]] + ([api_keys_arn] if role == "gateway" else [])
        assert sorted(read) == sorted(expected), f"{role} read {read}"
        assert (run_dir / f"{role}.creds").read_text() == f"SECRET {arns[key]}\n"
        args = run.read_text().splitlines()
        volumes = [args[i + 1] for i, a in enumerate(args) if a == "-v"]
        assert [v for v in volumes if v.endswith(".creds:ro")] == [
            f"{run_dir}/{role}.creds:/run/secrets/mnemos/{role}.creds:ro"], f"{role} mounts {volumes}"
        assert args[args.index("--env-file") + 1] == f"/etc/mnemos/{role}.env"
        assert args[-2:] == ["mnemos:test", role]
    assert sorted(p.name for p in run_dir.glob("*.creds")) == sorted(f"{r}.creds" for r in CONTROL_PLANE_ROLES)
    done = subprocess.run(["bash", str(tmp_path / "mnemos-start"), "worker"], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}",
                               "STUB_LOG": str(tmp_path / "w.aws"), "STUB_RUN": str(tmp_path / "w.run")}, timeout=60)
    assert done.returncode == 2 and not (tmp_path / "w.aws").exists(), "an unknown role must read no secret"


def test_control_plane_reads_exactly_the_role_secrets_and_api_keys() -> None:
    statements = _policy_statements(CONTROL_PLANE)
    secrets = [s for s in statements
               if any(fnmatch.fnmatchcase("secretsmanager:GetSecretValue", a) or a.startswith("secretsmanager:")
                      for a in s["actions"])]
    assert len(secrets) == 1, f"secrets are granted by {[s.get('sid') for s in secrets]}"
    (grant,) = secrets
    assert grant["actions"] == ["secretsmanager:GetSecretValue"]
    assert "condition" not in grant
    expected = [f"${{var.nats_creds_secret_arns.{key}}}" for key in CONTROL_PLANE_ROLES.values()]
    expected.append("${var.gateway_api_keys_secret_arn}")
    assert sorted(_as_list(grant["resources"])) == sorted(expected)
    for s in statements:
        assert "*" not in s["actions"], f"statement {s.get('sid')} allows every action"


# ----------------------------------------------------------------------------- references


def _references(directory: Path, prefix: str) -> set[str]:
    return set(re.findall(rf"(?<![\w.]){prefix}\.([A-Za-z_][\w-]*)", _source(directory)))


@pytest.mark.parametrize("directory", CONFIG_DIRS, ids=lambda d: d.name)
def test_variables_and_locals_are_declared_and_used(directory: Path) -> None:
    declared = set(_named(directory, "variable"))
    used = _references(directory, "var")
    assert used <= declared, f"{directory.name}: var.{sorted(used - declared)} not declared"
    assert declared <= used, f"{directory.name}: variables {sorted(declared - used)} are never used"
    local_names = set(_locals(directory))
    used_locals = _references(directory, "local")
    assert used_locals <= local_names, f"{directory.name}: local.{sorted(used_locals - local_names)} not declared"


@pytest.mark.parametrize("directory", CONFIG_DIRS, ids=lambda d: d.name)
def test_resource_references_resolve(directory: Path) -> None:
    source = _source(directory)
    resources = set(_resources(directory))
    data = set(_resources(directory, "data"))
    for rtype, name in re.findall(r"(?<![\w.:/])(aws_[a-z0-9_]+)\.([a-z0-9_]+)\b", source):
        assert (rtype, name) in resources, f"{directory.name}: {rtype}.{name} is not declared"
    for rtype, name in re.findall(r"(?<![\w.])data\.([a-z0-9_]+)\.([a-z0-9_]+)", source):
        assert (rtype, name) in data, f"{directory.name}: data.{rtype}.{name} is not declared"


def test_example_module_calls_match_the_modules() -> None:
    calls = _named(EXAMPLE, "module")
    assert {"nats", "control_plane", "pool_on_demand", "pool_spot"} <= set(calls)
    for call_name, args in calls.items():
        module_dir = (EXAMPLE / args["source"]).resolve()
        assert module_dir.parent == MODULES.resolve(), f"module {call_name}: unexpected source {args['source']}"
        variables = _named(module_dir, "variable")
        passed = set(args) - META_ARGUMENTS
        unknown = passed - set(variables)
        assert not unknown, f"module {call_name} passes undeclared variables {sorted(unknown)}"
        required = {v for v, body in variables.items() if "default" not in body}
        missing = required - passed
        assert not missing, f"module {call_name} does not pass required variables {sorted(missing)}"
    # module.<call>.<output> must name a call and one of its module's outputs.
    for call_name, output in re.findall(r"(?<![\w.])module\.(\w+)\.(\w+)", _source(EXAMPLE)):
        assert call_name in calls, f"module.{call_name} is not declared"
        module_dir = (EXAMPLE / calls[call_name]["source"]).resolve()
        assert output in _named(module_dir, "output"), f"module.{call_name}.{output} is not an output"


def test_example_has_both_pool_kinds() -> None:
    calls = _named(EXAMPLE, "module")
    on_demand, spot = calls["pool_on_demand"], calls["pool_spot"]
    assert on_demand["capacity_type"] == "on-demand" and on_demand.get("warm_pool")
    assert spot["capacity_type"] == "spot" and "warm_pool" not in spot


# ----------------------------------------------------------------------------- docs


def _skips() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2).strip()) for p in TF_FILES
            for m in re.finditer(r"#\s*checkov:skip=(CKV2?_[A-Z0-9_]+):(.*)", p.read_text())]


def test_readme_explains_every_variable_and_skip() -> None:
    readme = (TF / "README.md").read_text()
    for directory in CONFIG_DIRS:
        for name in _named(directory, "variable"):
            assert f"`{name}`" in readme, f"infra/terraform/README.md does not explain {directory.name}'s {name}"
    for check, reason in _skips():
        assert reason, f"checkov skip {check} without a reason"
        assert check in readme, f"infra/terraform/README.md does not list the checkov skip {check}"
    for word in ("provider_settings", "region", "group", POOL_TAG, NAMESPACE_TAG, LIFECYCLE_HOOK):
        assert word in readme


# ----------------------------------------------------------------------------- checkov


def _checkov_command() -> list[str]:
    explicit = os.environ.get("MNEMOS_CHECKOV")
    if explicit:  # a checkov installed elsewhere (its own virtual environment)
        return [explicit]
    if importlib.util.find_spec("checkov") is None:
        pytest.skip("checkov is not importable (set MNEMOS_CHECKOV to a checkov executable to run it)")
    beside = Path(sys.executable).with_name("checkov")
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "checkov.main"]


def test_checkov_finds_no_failed_check(tmp_path: Path) -> None:
    command = _checkov_command() + [
        "-d", str(TF), "--framework", "terraform", "--compact", "--quiet",
        "--skip-download", "--output", "json",
    ]
    env = {**os.environ, "HOME": str(tmp_path), "BC_SKIP_MAPPING": "TRUE"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.stdout.strip(), f"checkov printed nothing (rc {done.returncode}): {done.stderr[-2000:]}"
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [f"{r['check_id']} {r['resource']} ({r['file_path']}:{r['file_line_range']})"
              for report in reports for r in report.get("results", {}).get("failed_checks", [])]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    summary = [report["summary"] for report in reports if "summary" in report]
    assert summary and sum(s["passed"] for s in summary) > 0, done.stdout[-2000:]
    assert sum(s["parsing_errors"] for s in summary) == 0
    assert done.returncode == 0, done.stderr[-2000:]

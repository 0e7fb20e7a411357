# Instance role of the control plane. Least privilege for the autoscaler's `aws` provider
# (control_plane/autoscaler/providers/aws.py):
#   - reads: autoscaling:Describe* and ec2:DescribeInstances, on "*" (AWS has no resource
#     types for them);
#   - changes: SetDesiredCapacity, TerminateInstanceInAutoScalingGroup,
#     SetInstanceProtection, CompleteLifecycleAction, RecordLifecycleActionHeartbeat, and
#     only on groups tagged mnemos:namespace = var.namespace. The role cannot tag or untag
#     anything, so it cannot bring another group into its namespace;
#   - the three roles' NATS credentials (control-plane, gateway, autoscaler: one secret
#     each) and the gateway's API keys; ECR pull of its image. Only the host and the
#     autoscaler container (host network) reach IMDS (hop limit 1), so only they can use
#     the role; the control-plane and gateway containers get just their own files.

data "aws_iam_policy_document" "assume" {
  statement {
    sid     = "Ec2AssumeRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "control_plane" {
  name                 = local.name
  description          = "MNEMOS control plane, gateway and autoscaler (namespace ${var.namespace})"
  assume_role_policy   = data.aws_iam_policy_document.assume.json
  permissions_boundary = var.iam_permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_instance_profile" "control_plane" {
  name = local.name
  role = aws_iam_role.control_plane.name
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.control_plane.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "control_plane" {
  statement {
    sid       = "DescribeAutoScaling"
    actions   = ["autoscaling:Describe*"]
    resources = ["*"] # Describe* actions support no resource-level permissions
  }

  statement {
    sid       = "DescribeInstances"
    actions   = ["ec2:DescribeInstances"]
    resources = ["*"] # ec2:Describe* actions support no resource-level permissions
  }

  statement {
    sid     = "ScaleGroupsOfThisNamespace"
    actions = [
      "autoscaling:SetDesiredCapacity",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
      "autoscaling:SetInstanceProtection",
      "autoscaling:CompleteLifecycleAction",
      "autoscaling:RecordLifecycleActionHeartbeat",
    ]
    resources = [
      for region in local.autoscaling_regions :
      "arn:${data.aws_partition.current.partition}:autoscaling:${region}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/*"
    ]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/mnemos:namespace"
      values   = [var.namespace]
    }
  }

  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [
      var.nats_creds_secret_arns.control_plane,
      var.nats_creds_secret_arns.gateway,
      var.nats_creds_secret_arns.autoscaler,
      var.gateway_api_keys_secret_arn,
    ]
  }

  dynamic "statement" {
    for_each = var.secrets_kms_key_arn == null ? [] : [var.secrets_kms_key_arn]
    content {
      sid       = "DecryptSecrets"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
      }
    }
  }

  dynamic "statement" {
    for_each = length(local.ecr_repository_arns) > 0 ? [1] : []
    content {
      sid       = "EcrLogin"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"] # GetAuthorizationToken has no resource type
    }
  }

  dynamic "statement" {
    for_each = length(local.ecr_repository_arns) > 0 ? [1] : []
    content {
      sid       = "EcrPullImage"
      actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      resources = local.ecr_repository_arns
    }
  }
}

resource "aws_iam_role_policy" "control_plane" {
  name   = "mnemos-control-plane"
  role   = aws_iam_role.control_plane.id
  policy = data.aws_iam_policy_document.control_plane.json
}

# Instance role of the workers: SSM Session Manager, read this pool's NATS credentials
# secret, pull the worker image from ECR, and (optionally) read model artifacts from S3.
# Nothing else: the worker container runs user code.

data "aws_iam_policy_document" "worker_assume" {
  statement {
    sid     = "Ec2AssumeRole"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "worker" {
  name                 = local.role_name
  description          = "MNEMOS GPU workers of pool ${var.name} (namespace ${var.namespace})"
  assume_role_policy   = data.aws_iam_policy_document.worker_assume.json
  permissions_boundary = var.iam_permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_instance_profile" "worker" {
  name = local.role_name
  role = aws_iam_role.worker.name
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.worker.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "worker" {
  statement {
    sid       = "ReadNatsCredentials"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.nats_creds_secret_arn]
  }

  dynamic "statement" {
    for_each = var.secrets_kms_key_arn == null ? [] : [var.secrets_kms_key_arn]
    content {
      sid       = "DecryptNatsCredentials"
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
      sid       = "EcrPullWorkerImage"
      actions   = ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      resources = local.ecr_repository_arns
    }
  }

  dynamic "statement" {
    for_each = length(var.artifact_bucket_arns) > 0 ? [1] : []
    content {
      sid       = "ListArtifactBuckets"
      actions   = ["s3:ListBucket"]
      resources = var.artifact_bucket_arns
    }
  }

  dynamic "statement" {
    for_each = length(var.artifact_bucket_arns) > 0 ? [1] : []
    content {
      sid       = "ReadArtifacts"
      actions   = ["s3:GetObject"]
      resources = [for arn in var.artifact_bucket_arns : "${arn}/*"]
    }
  }

  # With a warm pool the boot script completes the mnemos-warm launch hook of its own group.
  dynamic "statement" {
    for_each = var.warm_pool == null ? [] : [1]
    content {
      sid       = "SeeOwnLifecycleState"
      actions   = ["autoscaling:DescribeAutoScalingInstances"]
      resources = ["*"] # Describe* actions have no resource type
    }
  }

  dynamic "statement" {
    for_each = var.warm_pool == null ? [] : [1]
    content {
      sid       = "CompleteOwnLaunchHook"
      actions   = ["autoscaling:CompleteLifecycleAction"]
      resources = [local.group_arn_pattern]
    }
  }
}

resource "aws_iam_role_policy" "worker" {
  name   = "mnemos-worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

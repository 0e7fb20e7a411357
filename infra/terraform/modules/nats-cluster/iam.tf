# Instance role of the NATS servers: SSM Session Manager and read the authorization
# configuration secret; nothing else.

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

resource "aws_iam_role" "nats" {
  name                 = "${var.name}-nats"
  description          = "MNEMOS NATS servers of cluster ${var.name}"
  assume_role_policy   = data.aws_iam_policy_document.assume.json
  permissions_boundary = var.iam_permissions_boundary_arn
  tags                 = local.tags
}

resource "aws_iam_instance_profile" "nats" {
  name = "${var.name}-nats"
  role = aws_iam_role.nats.name
  tags = local.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count      = var.enable_ssm ? 1 : 0
  role       = aws_iam_role.nats.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "nats" {
  statement {
    sid       = "ReadAuthConfig"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.auth_config_secret_arn]
  }

  dynamic "statement" {
    for_each = var.secrets_kms_key_arn == null ? [] : [var.secrets_kms_key_arn]
    content {
      sid       = "DecryptAuthConfig"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["secretsmanager.${data.aws_region.current.name}.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "nats" {
  name   = "mnemos-nats"
  role   = aws_iam_role.nats.id
  policy = data.aws_iam_policy_document.nats.json
}

# The MNEMOS control plane: a fixed-size Auto Scaling group (it heals itself; Terraform,
# not the MNEMOS autoscaler, sizes it) whose instances each run three containers of the
# MNEMOS image, as systemd units mnemos@control-plane, mnemos@gateway and
# mnemos@autoscaler:
#   - `mnemos control-plane` (bridge network, no published port);
#   - `mnemos gateway` (bridge network, gateway_port published), with the API keys file;
#   - `mnemos autoscaler` (host network, so that it reaches IMDSv2 with a hop limit of 1 and
#     acts with the instance role below on the worker groups of its namespace).
# Each container connects to NATS as its role's user (mnemos/permissions.py), with its own
# credentials file read from its own secret (var.nats_creds_secret_arns).
# The group deliberately carries no mnemos:namespace tag: its own role must not resize it.

data "aws_region" "current" {}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_ssm_parameter" "ami" {
  count = var.ami_id == null ? 1 : 0
  name  = var.ami_ssm_parameter_name
}

locals {
  name   = coalesce(var.name, "${var.namespace}-control-plane")
  ami_id = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.ami[0].value)

  ecr_match           = regexall("^(([0-9]{12})\\.dkr\\.ecr\\.([a-z0-9-]+)\\.amazonaws\\.com(\\.cn)?)/([^:@]+)", var.image)
  ecr_registry        = length(local.ecr_match) > 0 ? local.ecr_match[0][0] : ""
  ecr_region          = length(local.ecr_match) > 0 ? local.ecr_match[0][2] : ""
  ecr_repository_arns = concat(
    length(local.ecr_match) > 0 ? ["arn:${data.aws_partition.current.partition}:ecr:${local.ecr_match[0][2]}:${local.ecr_match[0][1]}:repository/${local.ecr_match[0][4]}"] : [],
    var.ecr_repository_arns,
  )

  autoscaling_regions = length(var.autoscaling_regions) > 0 ? var.autoscaling_regions : [data.aws_region.current.name]

  # Environment of all three containers.
  common_env = {
    MNEMOS_NATS_URL  = var.nats_url
    MNEMOS_NAMESPACE = var.namespace
    MNEMOS_REPLICAS  = tostring(var.replicas)
  }

  # Everything the boot script template (templates/boot.sh.tftpl) interpolates. Each role
  # connects as its own NATS user: mnemos-start <role> reads that role's secret into
  # /run/mnemos/<role>.creds and mounts it at /run/secrets/mnemos/<role>.creds
  # (MNEMOS_NATS_CREDS) into that role's container only.
  boot_vars = {
    name                        = local.name
    image                       = var.image
    nats_creds_secret_arns      = var.nats_creds_secret_arns
    gateway_api_keys_secret_arn = var.gateway_api_keys_secret_arn
    gateway_port                = var.gateway_port
    ecr_registry                = local.ecr_registry
    ecr_region                  = local.ecr_region
    container_uid               = var.container_uid
    control_plane_env           = merge(var.control_plane_env, local.common_env, {
      MNEMOS_NATS_CREDS = "/run/secrets/mnemos/control-plane.creds"
    })
    gateway_env = merge(var.gateway_env, local.common_env, {
      MNEMOS_NATS_CREDS            = "/run/secrets/mnemos/gateway.creds"
      MNEMOS_GATEWAY_HOST          = "0.0.0.0"
      MNEMOS_GATEWAY_PORT          = tostring(var.gateway_port)
      MNEMOS_GATEWAY_API_KEYS_FILE = "/run/secrets/mnemos/gateway-api-keys.json"
    })
    autoscaler_env = merge(var.autoscaler_env, local.common_env, {
      MNEMOS_NATS_CREDS  = "/run/secrets/mnemos/autoscaler.creds"
      AWS_REGION         = data.aws_region.current.name
      AWS_DEFAULT_REGION = data.aws_region.current.name
    })
  }

  tags = merge(var.tags, { "mnemos:component" = "control-plane" })
}

# ---------------------------------------------------------------------------- network

resource "aws_security_group" "control_plane" {
  name_prefix = "${local.name}-"
  description = "MNEMOS control plane: the HTTP gateway in, NATS and AWS APIs out"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "gateway_cidr" {
  for_each = toset(var.gateway_ingress_cidr_blocks)

  security_group_id = aws_security_group.control_plane.id
  description       = "MNEMOS HTTP gateway"
  ip_protocol       = "tcp"
  from_port         = var.gateway_port
  to_port           = var.gateway_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "gateway_sg" {
  for_each = var.gateway_ingress_security_group_ids

  security_group_id            = aws_security_group.control_plane.id
  description                  = "MNEMOS HTTP gateway (${each.key})"
  ip_protocol                  = "tcp"
  from_port                    = var.gateway_port
  to_port                      = var.gateway_port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidr_blocks)

  security_group_id = aws_security_group.control_plane.id
  description       = "HTTPS: ECR, Auto Scaling, EC2, Secrets Manager, SSM"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "nats_sg" {
  for_each = var.nats_security_group_ids

  security_group_id            = aws_security_group.control_plane.id
  description                  = "NATS clients to the MNEMOS NATS servers (${each.key})"
  ip_protocol                  = "tcp"
  from_port                    = var.nats_port
  to_port                      = var.nats_port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "nats_cidr" {
  for_each = toset(var.nats_egress_cidr_blocks)

  security_group_id = aws_security_group.control_plane.id
  description       = "NATS clients to the MNEMOS NATS servers"
  ip_protocol       = "tcp"
  from_port         = var.nats_port
  to_port           = var.nats_port
  cidr_ipv4         = each.value
}

# ---------------------------------------------------------------------------- instances

resource "aws_launch_template" "control_plane" {
  name                   = local.name
  description            = "MNEMOS control plane, gateway and autoscaler (namespace ${var.namespace})"
  image_id               = local.ami_id
  instance_type          = var.instance_type
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(templatefile("${path.module}/templates/boot.sh.tftpl", local.boot_vars))

  iam_instance_profile {
    arn = aws_iam_instance_profile.control_plane.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = var.associate_public_ip_address
    delete_on_termination       = true
    security_groups             = [aws_security_group.control_plane.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size_gb
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = local.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = local.name })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "control_plane" {
  name                      = local.name
  vpc_zone_identifier       = var.subnet_ids
  min_size                  = var.instance_count
  max_size                  = var.instance_count
  desired_capacity          = var.instance_count
  target_group_arns         = var.gateway_target_group_arns
  health_check_type         = length(var.gateway_target_group_arns) > 0 ? "ELB" : "EC2"
  health_check_grace_period = 180
  wait_for_capacity_timeout = "0"

  launch_template {
    id      = aws_launch_template.control_plane.id
    version = aws_launch_template.control_plane.latest_version
  }

  # One instance at a time when the launch template changes.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  tag {
    key                 = "Name"
    value               = local.name
    propagate_at_launch = true
  }

  tag {
    key                 = "mnemos:component"
    value               = "control-plane"
    propagate_at_launch = true
  }

  dynamic "tag" {
    for_each = var.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}

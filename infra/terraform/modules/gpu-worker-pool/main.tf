# One MNEMOS pool of GPU workers: an EC2 Auto Scaling group the `aws` autoscaler provider
# drives (control_plane/autoscaler/providers/aws.py). The contract with it, checked by
# tests/test_terraform.py:
#   - the group carries the tags "mnemos:pool" (pool name) and "mnemos:namespace";
#   - it has the termination lifecycle hook "mnemos-drain";
#   - every instance's boot script starts the worker with MNEMOS_NATS_URL, MNEMOS_NAMESPACE,
#     MNEMOS_NATS_CREDS, MNEMOS_WORKER_ID (the instance id) and MNEMOS_WORKER_TAGS
#     ("pool=<name>,provider=aws");
#   - the autoscaler, not AWS, decides scale-in: new instances are protected from scale-in,
#     the desired capacity is not managed here after creation, and no scaling policy exists.

data "aws_region" "current" {}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_ssm_parameter" "ami" {
  count = var.ami_id == null ? 1 : 0
  name  = var.ami_ssm_parameter_name
}

locals {
  group_name = coalesce(var.group_name, "${var.namespace}-${var.name}")
  # IAM role and instance profile names are limited to 64 characters.
  role_name = substr("${local.group_name}-worker", 0, 64)
  is_spot   = var.capacity_type == "spot"
  # A warm pool cannot go with a mixed instances policy; spot always needs one.
  use_mixed_instances = local.is_spot || (var.warm_pool == null && length(var.instance_types) > 1)
  # With a warm pool, a launching instance waits in this launch hook until its boot script
  # has pulled the worker image (else AWS would stop it half-prepared).
  warm_hook_name    = var.warm_pool == null ? "" : "mnemos-warm"
  group_arn_pattern = "arn:${data.aws_partition.current.partition}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${local.group_name}"
  ami_id            = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.ami[0].value)

  # "<account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:tag|@digest]"
  ecr_match           = regexall("^(([0-9]{12})\\.dkr\\.ecr\\.([a-z0-9-]+)\\.amazonaws\\.com(\\.cn)?)/([^:@]+)", var.worker_image)
  ecr_registry        = length(local.ecr_match) > 0 ? local.ecr_match[0][0] : ""
  ecr_region          = length(local.ecr_match) > 0 ? local.ecr_match[0][2] : ""
  ecr_repository_arns = concat(
    length(local.ecr_match) > 0 ? ["arn:${data.aws_partition.current.partition}:ecr:${local.ecr_match[0][2]}:${local.ecr_match[0][1]}:repository/${local.ecr_match[0][4]}"] : [],
    var.ecr_repository_arns,
  )

  # Everything the boot script template (templates/boot.sh.tftpl) interpolates.
  boot_vars = {
    pool_name             = var.name
    namespace             = var.namespace
    nats_url              = var.nats_url
    nats_creds_secret_arn = var.nats_creds_secret_arn
    worker_image          = var.worker_image
    worker_args           = var.worker_args
    worker_env            = var.worker_env
    group_name            = local.group_name
    warm_hook_name        = local.warm_hook_name
    ecr_registry          = local.ecr_registry
    ecr_region            = local.ecr_region
    container_uid         = var.container_uid
    shm_size              = var.shm_size
    stop_timeout_s        = var.stop_timeout_s
  }

  tags = merge(var.tags, {
    "mnemos:pool"      = var.name
    "mnemos:namespace" = var.namespace
  })
}

# ---------------------------------------------------------------------------- network

resource "aws_security_group" "worker" {
  name_prefix = "${local.group_name}-worker-"
  description = "MNEMOS GPU workers of pool ${var.name} (outbound only)"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${local.group_name}-worker" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidr_blocks)

  security_group_id = aws_security_group.worker.id
  description       = "HTTPS: ECR, S3, Secrets Manager, SSM, model downloads"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "nats_sg" {
  for_each = var.nats_security_group_ids

  security_group_id            = aws_security_group.worker.id
  description                  = "NATS clients to the MNEMOS NATS servers (${each.key})"
  ip_protocol                  = "tcp"
  from_port                    = var.nats_port
  to_port                      = var.nats_port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_egress_rule" "nats_cidr" {
  for_each = toset(var.nats_egress_cidr_blocks)

  security_group_id = aws_security_group.worker.id
  description       = "NATS clients to the MNEMOS NATS servers"
  ip_protocol       = "tcp"
  from_port         = var.nats_port
  to_port           = var.nats_port
  cidr_ipv4         = each.value
}

# ---------------------------------------------------------------------------- launch template

resource "aws_launch_template" "worker" {
  name                   = local.group_name
  description            = "MNEMOS GPU worker, pool ${var.name} (namespace ${var.namespace})"
  image_id               = local.ami_id
  instance_type          = var.instance_types[0]
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64encode(templatefile("${path.module}/templates/boot.sh.tftpl", local.boot_vars))

  iam_instance_profile {
    arn = aws_iam_instance_profile.worker.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.allow_container_imds ? 2 : 1
  }

  network_interfaces {
    device_index                = 0
    associate_public_ip_address = var.associate_public_ip_address
    delete_on_termination       = true
    security_groups             = concat([aws_security_group.worker.id], var.additional_security_group_ids)
  }

  block_device_mappings {
    device_name = var.root_volume_device_name

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
    resource_type = "volume"
    tags          = local.tags
  }

  tag_specifications {
    resource_type = "network-interface"
    tags          = local.tags
  }

  tags = local.tags
}

# ---------------------------------------------------------------------------- group

resource "aws_autoscaling_group" "pool" {
  name                = local.group_name
  vpc_zone_identifier = var.subnet_ids
  min_size            = var.min_size
  max_size            = var.max_size
  desired_capacity    = coalesce(var.desired_capacity, var.min_size)

  # The autoscaler picks which instance to remove (TerminateInstanceInAutoScalingGroup),
  # never AWS: new instances are protected from scale-in.
  protect_from_scale_in     = true
  capacity_rebalance        = local.is_spot
  health_check_type         = "EC2"
  health_check_grace_period = var.health_check_grace_period_s
  suspended_processes       = var.suspended_processes
  max_instance_lifetime     = var.max_instance_lifetime_s
  wait_for_capacity_timeout = "0"
  enabled_metrics           = concat(
    ["GroupDesiredCapacity", "GroupInServiceInstances", "GroupPendingInstances", "GroupTerminatingInstances", "GroupTotalInstances"],
    var.warm_pool == null ? [] : ["WarmPoolDesiredCapacity", "WarmPoolWarmedCapacity", "WarmPoolPendingCapacity"],
  )

  dynamic "launch_template" {
    for_each = local.use_mixed_instances ? [] : [1]
    content {
      id      = aws_launch_template.worker.id
      version = aws_launch_template.worker.latest_version
    }
  }

  dynamic "mixed_instances_policy" {
    for_each = local.use_mixed_instances ? [1] : []
    content {
      instances_distribution {
        on_demand_base_capacity                  = 0
        on_demand_percentage_above_base_capacity = local.is_spot ? 0 : 100
        on_demand_allocation_strategy            = var.on_demand_allocation_strategy
        spot_allocation_strategy                 = var.spot_allocation_strategy
      }

      launch_template {
        launch_template_specification {
          launch_template_id = aws_launch_template.worker.id
          version            = aws_launch_template.worker.latest_version
        }

        dynamic "override" {
          for_each = var.instance_types
          content {
            instance_type = override.value
          }
        }
      }
    }
  }

  dynamic "warm_pool" {
    for_each = var.warm_pool == null ? [] : [var.warm_pool]
    content {
      pool_state = warm_pool.value.pool_state
      min_size   = warm_pool.value.min_size
      # Null: exactly min_size instances stay warm (AWS's own default would be max_size).
      max_group_prepared_capacity = warm_pool.value.max_group_prepared_capacity != null ? warm_pool.value.max_group_prepared_capacity : warm_pool.value.min_size

      instance_reuse_policy {
        reuse_on_scale_in = warm_pool.value.reuse_on_scale_in
      }
    }
  }

  dynamic "initial_lifecycle_hook" {
    for_each = var.warm_pool == null ? [] : [var.warm_pool]
    content {
      name                 = local.warm_hook_name
      lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
      heartbeat_timeout    = initial_lifecycle_hook.value.launch_timeout_s
      default_result       = "CONTINUE"
    }
  }

  # The autoscaler reads these two tags to find the group of a pool.
  tag {
    key                 = "mnemos:pool"
    value               = var.name
    propagate_at_launch = true
  }

  tag {
    key                 = "mnemos:namespace"
    value               = var.namespace
    propagate_at_launch = true
  }

  tag {
    key                 = "Name"
    value               = "${local.group_name}-worker"
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

  lifecycle {
    # The autoscaler sets the desired capacity; Terraform must not reset it.
    ignore_changes = [desired_capacity]

    precondition {
      condition     = var.warm_pool == null || var.capacity_type == "on-demand"
      error_message = "A warm pool is only for on-demand groups (AWS does not support warm pools with spot instances)."
    }

    precondition {
      condition     = var.warm_pool == null || length(var.instance_types) == 1
      error_message = "A warm pool needs exactly one instance type (it cannot go with a mixed instances policy)."
    }

    precondition {
      condition     = var.min_size <= var.max_size
      error_message = "min_size must not exceed max_size."
    }
  }
}

# An instance AWS takes away by itself (spot interruption, capacity rebalancing, a failed
# health check, max_instance_lifetime) waits in Terminating:Wait until the autoscaler has
# drained its worker and completed the action; then (or after the heartbeat timeout) it
# terminates.
resource "aws_autoscaling_lifecycle_hook" "drain" {
  name                   = "mnemos-drain"
  autoscaling_group_name = aws_autoscaling_group.pool.name
  lifecycle_transition   = "autoscaling:EC2_INSTANCE_TERMINATING"
  heartbeat_timeout      = var.lifecycle_hook_heartbeat_timeout_s
  default_result         = "CONTINUE"
}

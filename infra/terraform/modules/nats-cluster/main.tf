# A JetStream cluster of node_count (3 or 5) nats-server nodes for MNEMOS (every bucket and
# stream R3 with MNEMOS_REPLICAS=3). Each node has:
#   - a network interface of its own, so that its private IP (in every node's routes and in
#     the clients' MNEMOS_NATS_URL) survives the replacement of the instance;
#   - an encrypted gp3 EBS volume of its own for the JetStream store (/var/lib/nats), which
#     also survives the replacement of the instance;
#   - nats-server in a container (host network) run by systemd, configured from
#     templates/nats-server.conf.tftpl plus the authorization configuration read from
#     Secrets Manager at every start.
# Servers are never replaced by Terraform on their own (ignore_changes on ami and
# user_data): replace one at a time, waiting for `nats server report jetstream` to show it
# current, e.g. terraform apply -replace='module.nats.aws_instance.node[0]'.

data "aws_region" "current" {}

data "aws_partition" "current" {}

data "aws_ssm_parameter" "ami" {
  count = var.ami_id == null ? 1 : 0
  name  = var.ami_ssm_parameter_name
}

data "aws_subnet" "node" {
  count = var.node_count
  id    = var.subnet_ids[count.index % length(var.subnet_ids)]
}

locals {
  client_port     = 4222
  cluster_port    = 6222
  monitoring_port = 8222

  ami_id   = var.ami_id != null ? var.ami_id : nonsensitive(data.aws_ssm_parameter.ami[0].value)
  node_azs = [for s in data.aws_subnet.node : s.availability_zone]
  # Replicas in distinct AZs only when every server is in its own AZ (else R3 could not be placed).
  unique_az_tag = length(distinct(local.node_azs)) >= var.node_count

  max_file_store = coalesce(var.jetstream_max_file_store, "${floor(var.data_volume_size_gb * 0.9)}G")
  route_ips      = aws_network_interface.node[*].private_ip

  tags = merge(var.tags, { "mnemos:component" = "nats" })
}

# ---------------------------------------------------------------------------- network

resource "aws_security_group" "nats" {
  name_prefix = "${var.name}-nats-"
  description = "MNEMOS NATS servers: clients 4222, cluster routes 6222 between servers, monitoring 8222"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = "${var.name}-nats" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "routes" {
  security_group_id            = aws_security_group.nats.id
  description                  = "NATS cluster routes between the servers"
  ip_protocol                  = "tcp"
  from_port                    = local.cluster_port
  to_port                      = local.cluster_port
  referenced_security_group_id = aws_security_group.nats.id
}

resource "aws_vpc_security_group_egress_rule" "routes" {
  security_group_id            = aws_security_group.nats.id
  description                  = "NATS cluster routes between the servers"
  ip_protocol                  = "tcp"
  from_port                    = local.cluster_port
  to_port                      = local.cluster_port
  referenced_security_group_id = aws_security_group.nats.id
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.https_egress_cidr_blocks)

  security_group_id = aws_security_group.nats.id
  description       = "HTTPS: container registry, Secrets Manager, SSM, packages"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "client_cidr" {
  for_each = toset(var.client_cidr_blocks)

  security_group_id = aws_security_group.nats.id
  description       = "NATS clients"
  ip_protocol       = "tcp"
  from_port         = local.client_port
  to_port           = local.client_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "client_sg" {
  for_each = var.client_security_group_ids

  security_group_id            = aws_security_group.nats.id
  description                  = "NATS clients (${each.key})"
  ip_protocol                  = "tcp"
  from_port                    = local.client_port
  to_port                      = local.client_port
  referenced_security_group_id = each.value
}

resource "aws_vpc_security_group_ingress_rule" "monitoring_cidr" {
  for_each = toset(var.monitoring_cidr_blocks)

  security_group_id = aws_security_group.nats.id
  description       = "NATS HTTP monitoring"
  ip_protocol       = "tcp"
  from_port         = local.monitoring_port
  to_port           = local.monitoring_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "monitoring_sg" {
  for_each = var.monitoring_security_group_ids

  security_group_id            = aws_security_group.nats.id
  description                  = "NATS HTTP monitoring (${each.key})"
  ip_protocol                  = "tcp"
  from_port                    = local.monitoring_port
  to_port                      = local.monitoring_port
  referenced_security_group_id = each.value
}

resource "aws_network_interface" "node" {
  count = var.node_count

  subnet_id       = data.aws_subnet.node[count.index].id
  security_groups = [aws_security_group.nats.id]
  description     = "${var.name}-${count.index + 1} (stable address of a NATS server)"
  tags            = merge(local.tags, { Name = "${var.name}-${count.index + 1}" })
}

# ---------------------------------------------------------------------------- storage

resource "aws_ebs_volume" "data" {
  count = var.node_count

  availability_zone = data.aws_subnet.node[count.index].availability_zone
  type              = "gp3"
  size              = var.data_volume_size_gb
  iops              = var.data_volume_iops
  throughput        = var.data_volume_throughput
  encrypted         = true
  kms_key_id        = var.ebs_kms_key_arn
  final_snapshot    = var.data_volume_final_snapshot
  tags              = merge(local.tags, { Name = "${var.name}-${count.index + 1}-jetstream" })
}

resource "aws_volume_attachment" "data" {
  count = var.node_count

  device_name                    = "/dev/sdf"
  volume_id                      = aws_ebs_volume.data[count.index].id
  instance_id                    = aws_instance.node[count.index].id
  stop_instance_before_detaching = true
}

# ---------------------------------------------------------------------------- servers

resource "aws_instance" "node" {
  count = var.node_count

  ami                  = local.ami_id
  instance_type        = var.instance_type
  iam_instance_profile = aws_iam_instance_profile.nats.name
  ebs_optimized        = true
  monitoring           = var.detailed_monitoring

  user_data_base64 = base64encode(templatefile("${path.module}/templates/boot.sh.tftpl", {
    server_name            = "${var.name}-${count.index + 1}"
    nats_image             = var.nats_image
    auth_config_secret_arn = var.auth_config_secret_arn
    data_volume_serial     = replace(aws_ebs_volume.data[count.index].id, "-", "")
    nats_config            = templatefile("${path.module}/templates/nats-server.conf.tftpl", {
      server_name      = "${var.name}-${count.index + 1}"
      cluster_name     = var.name
      az               = data.aws_subnet.node[count.index].availability_zone
      unique_az_tag    = local.unique_az_tag
      route_ips        = local.route_ips
      client_port      = local.client_port
      cluster_port     = local.cluster_port
      monitoring_port  = local.monitoring_port
      max_payload      = var.max_payload
      max_file_store   = local.max_file_store
      max_memory_store = var.jetstream_max_memory_store == null ? "" : var.jetstream_max_memory_store
    })
  }))

  network_interface {
    network_interface_id = aws_network_interface.node[count.index].id
    device_index         = 0
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    kms_key_id            = var.ebs_kms_key_arn
    delete_on_termination = true
    tags                  = merge(local.tags, { Name = "${var.name}-${count.index + 1}-root" })
  }

  tags = merge(local.tags, { Name = "${var.name}-${count.index + 1}" })

  lifecycle {
    ignore_changes = [ami, user_data, user_data_base64]
  }
}

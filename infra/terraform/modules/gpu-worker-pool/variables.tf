# ---------------------------------------------------------------------------- identity

variable "name" {
  description = "Name of the MNEMOS pool this group runs: the pool's `name` in `mnemos_pools`, the value of the `mnemos:pool` tag, and `pool=<name>` in every worker's MNEMOS_WORKER_TAGS."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,47}$", var.name))
    error_message = "A pool name is 1-48 characters of a-z, 0-9 and '-', starting with a letter or digit (mnemos.messages.PoolName)."
  }
}

variable "namespace" {
  description = "MNEMOS namespace (MNEMOS_NAMESPACE) of the workers: the value of the `mnemos:namespace` tag, which scopes what the autoscaler's IAM role may change."
  type        = string
  default     = "mnemos"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,31}$", var.namespace))
    error_message = "A namespace is 1-32 characters of a-z, 0-9 and '_', starting with a letter (mnemos.names.validate_prefix)."
  }
}

variable "group_name" {
  description = "Name of the Auto Scaling group (also names the launch template, role and security group). Null: \"<namespace>-<name>\". Put it in the pool's provider_settings.group only if the autoscaler cannot find the group by its tags."
  type        = string
  default     = null
}

variable "tags" {
  description = "Extra tags for every resource of the module (and, through the group, its instances). Must not set mnemos:pool or mnemos:namespace."
  type        = map(string)
  default     = {}

  validation {
    condition     = !contains(keys(var.tags), "mnemos:pool") && !contains(keys(var.tags), "mnemos:namespace")
    error_message = "The mnemos:pool and mnemos:namespace tags come from var.name and var.namespace."
  }
}

# ---------------------------------------------------------------------------- network

variable "vpc_id" {
  description = "VPC of the workers (their security group is created in it)."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets the group launches into (private subnets with a NAT gateway or VPC endpoints for ECR, S3, Secrets Manager and SSM). Several AZs give spot groups more capacity pools."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet."
  }
}

variable "associate_public_ip_address" {
  description = "Give each worker a public IPv4 address. Off by default: workers only make outbound connections."
  type        = bool
  default     = false
}

variable "additional_security_group_ids" {
  description = "Security groups attached to the workers besides the one the module creates."
  type        = list(string)
  default     = []
}

variable "https_egress_cidr_blocks" {
  description = "Where workers may open HTTPS (443) connections: ECR, S3, Secrets Manager, SSM, model hubs. Narrow it to your VPC endpoints' CIDRs where there is no internet egress."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "nats_security_group_ids" {
  description = "Security groups of the NATS servers the workers may connect to on nats_port, as a map from a static label to the group id (the labels must be known at plan time, the ids need not be), e.g. { nats = module.nats.security_group_id }."
  type        = map(string)
  default     = {}
}

variable "nats_egress_cidr_blocks" {
  description = "CIDR blocks of NATS servers the workers may connect to on nats_port (for servers outside the nats-cluster module)."
  type        = list(string)
  default     = []
}

variable "nats_port" {
  description = "TCP port of the NATS client listener, for the workers' egress rule."
  type        = number
  default     = 4222
}

# ---------------------------------------------------------------------------- capacity

variable "capacity_type" {
  description = "\"on-demand\" (launch template directly, or a mixed instances policy of on-demand instances when several types are given and there is no warm pool) or \"spot\" (mixed instances policy, 0% on-demand, capacity rebalancing on)."
  type        = string
  default     = "on-demand"

  validation {
    condition     = contains(["on-demand", "spot"], var.capacity_type)
    error_message = "capacity_type is \"on-demand\" or \"spot\"."
  }
}

variable "instance_types" {
  description = "GPU instance types, in order of preference. The first is the launch template's type; with a mixed instances policy every one is an override. A warm pool needs exactly one."
  type        = list(string)
  default     = ["g5.xlarge"]

  validation {
    condition     = length(var.instance_types) > 0
    error_message = "Give at least one instance type."
  }
}

variable "spot_allocation_strategy" {
  description = "Spot allocation strategy of spot groups."
  type        = string
  default     = "price-capacity-optimized"

  validation {
    condition     = contains(["price-capacity-optimized", "capacity-optimized", "capacity-optimized-prioritized", "lowest-price"], var.spot_allocation_strategy)
    error_message = "One of price-capacity-optimized, capacity-optimized, capacity-optimized-prioritized, lowest-price."
  }
}

variable "on_demand_allocation_strategy" {
  description = "On-demand allocation strategy of an on-demand group with several instance types: \"prioritized\" (the order of instance_types) or \"lowest-price\"."
  type        = string
  default     = "prioritized"

  validation {
    condition     = contains(["prioritized", "lowest-price"], var.on_demand_allocation_strategy)
    error_message = "One of prioritized, lowest-price."
  }
}

variable "min_size" {
  description = "Smallest size of the group. Keep it at or below the pool's min_workers: the autoscaler sets the desired capacity between min_size and max_size."
  type        = number
  default     = 0

  validation {
    condition     = var.min_size >= 0
    error_message = "min_size must be >= 0."
  }
}

variable "max_size" {
  description = "Largest size of the group: a hard ceiling over the pool's max_workers (the autoscaler cannot ask for more)."
  type        = number
  default     = 4

  validation {
    condition     = var.max_size >= 1
    error_message = "max_size must be >= 1."
  }
}

variable "desired_capacity" {
  description = "Desired capacity at creation only (null: min_size). Terraform ignores later changes: the autoscaler owns it."
  type        = number
  default     = null
}

variable "warm_pool" {
  description = "Warm pool of pre-initialised instances (worker image already pulled) for faster scale-up; on-demand groups with one instance type only. Null: none. pool_state: Stopped or Running; min_size: instances kept warm; max_group_prepared_capacity: the group's plus the warm pool's instances AWS prepares (null: min_size, so exactly min_size instances stay warm; AWS's own default is max_size); reuse_on_scale_in: return scaled-in instances to the warm pool; launch_timeout_s: how long a launching instance may take to pull the image (the mnemos-warm launch hook)."
  type        = object({
    pool_state                  = optional(string, "Stopped")
    min_size                    = optional(number, 0)
    max_group_prepared_capacity = optional(number)
    reuse_on_scale_in           = optional(bool, false)
    launch_timeout_s            = optional(number, 1800)
  })
  default = null

  validation {
    condition     = var.warm_pool == null ? true : contains(["Stopped", "Running"], var.warm_pool.pool_state)
    error_message = "warm_pool.pool_state is Stopped or Running (GPU instances cannot hibernate)."
  }
}

variable "lifecycle_hook_heartbeat_timeout_s" {
  description = "Seconds an instance AWS takes away by itself (spot interruption, rebalancing, health check) waits in Terminating:Wait for the autoscaler to drain its worker (the autoscaler extends it with heartbeats). After it the termination CONTINUEs."
  type        = number
  default     = 600

  validation {
    condition     = var.lifecycle_hook_heartbeat_timeout_s >= 30 && var.lifecycle_hook_heartbeat_timeout_s <= 7200
    error_message = "The heartbeat timeout is 30..7200 seconds."
  }
}

variable "health_check_grace_period_s" {
  description = "Seconds after launch before EC2 health checks count (GPU AMIs and large images boot slowly)."
  type        = number
  default     = 300
}

variable "suspended_processes" {
  description = "Auto Scaling processes to suspend. AZRebalance is suspended by default so that AWS never moves workers behind the autoscaler's back; never suspend Terminate or Launch."
  type        = list(string)
  default     = ["AZRebalance"]
}

variable "max_instance_lifetime_s" {
  description = "Replace instances older than this many seconds (86400..31536000); null: no limit. Replacements go through the mnemos-drain hook."
  type        = number
  default     = null
}

# ---------------------------------------------------------------------------- instances

variable "ami_id" {
  description = "AMI of the workers: must have Docker and the NVIDIA container toolkit (docker run --gpus). Null: the SSM parameter ami_ssm_parameter_name."
  type        = string
  default     = null
}

variable "ami_ssm_parameter_name" {
  description = "SSM parameter holding the AMI id when ami_id is null; default: the ECS GPU-optimized Amazon Linux 2 AMI (Docker and NVIDIA drivers preinstalled)."
  type        = string
  default     = "/aws/service/ecs/optimized-ami/amazon-linux-2/gpu/recommended/image_id"
}

variable "root_volume_size_gb" {
  description = "Size (GiB) of the encrypted gp3 root volume: the worker image plus the model cache (/var/cache/mnemos)."
  type        = number
  default     = 200
}

variable "root_volume_device_name" {
  description = "Device name of the AMI's root volume (/dev/xvda on Amazon Linux)."
  type        = string
  default     = "/dev/xvda"
}

variable "ebs_kms_key_arn" {
  description = "Customer-managed KMS key for the root volume; null: the account's default EBS key (still encrypted)."
  type        = string
  default     = null
}

variable "allow_container_imds" {
  description = "Let containers reach the instance metadata service (IMDSv2 hop limit 2), i.e. let the worker use the instance role (e.g. to read artifacts from S3 with MNEMOS_ARTIFACT_STORE=s3). Off: hop limit 1, only the host can."
  type        = bool
  default     = false
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore to the worker role (Session Manager instead of SSH keys)."
  type        = bool
  default     = true
}

variable "iam_permissions_boundary_arn" {
  description = "Permissions boundary for the worker role; null: none."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------- worker

variable "worker_image" {
  description = "Worker container image (infra/docker/Dockerfile built with EXTRAS=gpu; its entrypoint is `mnemos`). An ECR image gets ECR pull rights and a docker login at boot."
  type        = string
}

variable "worker_args" {
  description = "Arguments after `mnemos worker` (e.g. [\"--runtimes\", \"vllm\"])."
  type        = list(string)
  default     = []
}

variable "worker_env" {
  description = "Extra environment of the worker container (MNEMOS_WORKER_MAX_CONCURRENT_JOBS, MNEMOS_ARTIFACT_STORE, ...). Values are plain text in the launch template: no secrets. Must not set the variables the boot script sets (MNEMOS_NATS_URL, MNEMOS_NAMESPACE, MNEMOS_NATS_CREDS, MNEMOS_WORKER_ID, MNEMOS_WORKER_TAGS)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.worker_env : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k)) && !can(regex("[\n\r]", v))])
    error_message = "worker_env keys are environment variable names and values hold no newline."
  }

  validation {
    condition     = length(setintersection(keys(var.worker_env), ["MNEMOS_NATS_URL", "MNEMOS_NAMESPACE", "MNEMOS_NATS_CREDS", "MNEMOS_WORKER_ID", "MNEMOS_WORKER_TAGS"])) == 0
    error_message = "The boot script sets MNEMOS_NATS_URL, MNEMOS_NAMESPACE, MNEMOS_NATS_CREDS, MNEMOS_WORKER_ID and MNEMOS_WORKER_TAGS."
  }
}

variable "nats_url" {
  description = "MNEMOS_NATS_URL of the workers: comma-separated NATS URLs (the nats-cluster module's output nats_url)."
  type        = string

  validation {
    condition     = can(regex("^(nats|tls)://[^,\\s]+(,(nats|tls)://[^,\\s]+)*$", var.nats_url))
    error_message = "nats_url is comma-separated nats:// or tls:// URLs."
  }
}

variable "nats_creds_secret_arn" {
  description = "ARN of the Secrets Manager secret whose SecretString is the workers' NATS credentials file (nsc generate creds). Read at every boot into a tmpfs file given to the container as MNEMOS_NATS_CREDS."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the credentials secret (kms:Decrypt through Secrets Manager is granted); null: the secret uses the AWS-managed key."
  type        = string
  default     = null
}

variable "artifact_bucket_arns" {
  description = "S3 buckets (ARNs) the worker may read model artifacts from (MNEMOS_ARTIFACT_STORE=s3; needs allow_container_imds). Empty: no S3 access."
  type        = list(string)
  default     = []
}

variable "ecr_repository_arns" {
  description = "ECR repositories (ARNs) the instances may pull from besides worker_image's own."
  type        = list(string)
  default     = []
}

variable "container_uid" {
  description = "User id the worker image runs as (the Dockerfile's `mnemos` user): owner of the credentials file and the model cache."
  type        = number
  default     = 10001
}

variable "shm_size" {
  description = "Size of the worker container's /dev/shm (PyTorch and vLLM need more than Docker's 64m)."
  type        = string
  default     = "16g"
}

variable "stop_timeout_s" {
  description = "Seconds `docker stop` waits for the worker to drain (SIGTERM) before killing it; keep it above the worker's MNEMOS_WORKER_DRAIN_TIMEOUT_S."
  type        = number
  default     = 120
}

variable "namespace" {
  description = "MNEMOS namespace (MNEMOS_NAMESPACE) of the control plane. Its IAM role may change only Auto Scaling groups tagged mnemos:namespace = this."
  type        = string
  default     = "mnemos"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_]{0,31}$", var.namespace))
    error_message = "A namespace is 1-32 characters of a-z, 0-9 and '_', starting with a letter (mnemos.names.validate_prefix)."
  }
}

variable "name" {
  description = "Name of the control plane's group, launch template, role and security group. Null: \"<namespace>-control-plane\"."
  type        = string
  default     = null
}

variable "tags" {
  description = "Extra tags for every resource of the module. Must not set mnemos:pool or mnemos:namespace: a control-plane group tagged with the namespace could be resized by its own role."
  type        = map(string)
  default     = {}

  validation {
    condition     = !contains(keys(var.tags), "mnemos:pool") && !contains(keys(var.tags), "mnemos:namespace")
    error_message = "The control plane's resources must not carry the mnemos:pool or mnemos:namespace tags."
  }
}

# ---------------------------------------------------------------------------- network

variable "vpc_id" {
  description = "VPC of the control-plane instances."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets of the control-plane group (several AZs)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet."
  }
}

variable "associate_public_ip_address" {
  description = "Give each control-plane instance a public IPv4 address (off: put a load balancer in front of the gateway)."
  type        = bool
  default     = false
}

variable "gateway_port" {
  description = "Port of the HTTP gateway on the instances (MNEMOS_GATEWAY_PORT; published from the gateway container)."
  type        = number
  default     = 8080
}

variable "gateway_ingress_cidr_blocks" {
  description = "CIDR blocks allowed to reach the gateway port (e.g. the load balancer's subnets)."
  type        = list(string)
  default     = []
}

variable "gateway_ingress_security_group_ids" {
  description = "Security groups allowed to reach the gateway port (e.g. the load balancer's), as a map from a static label to the group id."
  type        = map(string)
  default     = {}
}

variable "gateway_target_group_arns" {
  description = "Load balancer target groups (port gateway_port) to register the instances in; with any, the group uses ELB health checks (point them at GET /healthz)."
  type        = list(string)
  default     = []
}

variable "https_egress_cidr_blocks" {
  description = "Where the instances may open HTTPS (443) connections: ECR, the Auto Scaling, EC2 and Secrets Manager APIs, SSM."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "nats_security_group_ids" {
  description = "Security groups of the NATS servers the instances may connect to on nats_port, as a map from a static label to the group id (the labels must be known at plan time, the ids need not be), e.g. { nats = module.nats.security_group_id }."
  type        = map(string)
  default     = {}
}

variable "nats_egress_cidr_blocks" {
  description = "CIDR blocks of NATS servers the instances may connect to on nats_port."
  type        = list(string)
  default     = []
}

variable "nats_port" {
  description = "TCP port of the NATS client listener, for the egress rule."
  type        = number
  default     = 4222
}

# ---------------------------------------------------------------------------- instances

variable "instance_count" {
  description = "Number of control-plane instances, each running the control-plane, gateway and autoscaler containers (every process is stateless; the autoscalers elect one acting autoscaler through NATS)."
  type        = number
  default     = 2

  validation {
    condition     = var.instance_count >= 1
    error_message = "Run at least one control-plane instance."
  }
}

variable "instance_type" {
  description = "EC2 instance type of the control-plane instances."
  type        = string
  default     = "m6i.large"
}

variable "ami_id" {
  description = "AMI of the control-plane instances (dnf or yum with a docker package, the AWS CLI). Null: the SSM parameter ami_ssm_parameter_name."
  type        = string
  default     = null
}

variable "ami_ssm_parameter_name" {
  description = "SSM parameter holding the AMI id when ami_id is null; default: the latest Amazon Linux 2023 (x86_64)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

variable "root_volume_size_gb" {
  description = "Size (GiB) of each instance's encrypted gp3 root volume."
  type        = number
  default     = 30
}

variable "ebs_kms_key_arn" {
  description = "Customer-managed KMS key for the root volumes; null: the account's default EBS key (still encrypted)."
  type        = string
  default     = null
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore to the control plane's role (Session Manager instead of SSH keys)."
  type        = bool
  default     = true
}

variable "iam_permissions_boundary_arn" {
  description = "Permissions boundary for the control plane's role; null: none."
  type        = string
  default     = null
}

# ---------------------------------------------------------------------------- MNEMOS

variable "image" {
  description = "MNEMOS container image (infra/docker/Dockerfile; entrypoint `mnemos`) for the control-plane, gateway and autoscaler containers. An ECR image gets ECR pull rights and a docker login at boot."
  type        = string
}

variable "nats_url" {
  description = "MNEMOS_NATS_URL: comma-separated NATS URLs (the nats-cluster module's output nats_url)."
  type        = string

  validation {
    condition     = can(regex("^(nats|tls)://[^,\\s]+(,(nats|tls)://[^,\\s]+)*$", var.nats_url))
    error_message = "nats_url is comma-separated nats:// or tls:// URLs."
  }
}

variable "replicas" {
  description = "MNEMOS_REPLICAS: JetStream replicas of every bucket and stream (3 on a 3- or 5-server cluster)."
  type        = number
  default     = 3
}

variable "nats_creds_secret_arns" {
  description = "ARNs of the Secrets Manager secrets holding each role's NATS credentials file from `mnemos auth init` as the SecretString: control_plane = creds/control-plane.creds, gateway = creds/gateway.creds, autoscaler = creds/autoscaler.creds (one user per role, each with its role's permissions). Each is read into /run/mnemos/<role>.creds and mounted into that role's container only, as MNEMOS_NATS_CREDS."
  type = object({
    control_plane = string
    gateway       = string
    autoscaler    = string
  })

  validation {
    condition     = length(distinct(values(var.nats_creds_secret_arns))) == 3
    error_message = "Give each role its own secret: control_plane, gateway and autoscaler are users with different permissions."
  }
}

variable "gateway_api_keys_secret_arn" {
  description = "ARN of the Secrets Manager secret whose SecretString is the gateway's API keys, a JSON object {\"<key>\": \"<tenant>\"} (MNEMOS_GATEWAY_API_KEYS_FILE; mounted into the gateway container only). The gateway refuses to listen beyond loopback without keys."
  type        = string
}

variable "secrets_kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the secrets (kms:Decrypt through Secrets Manager is granted); null: the AWS-managed key."
  type        = string
  default     = null
}

variable "autoscaling_regions" {
  description = "Regions of the worker groups the autoscaler may change (a pool's provider_settings.region); empty: the provider's region."
  type        = list(string)
  default     = []
}

variable "ecr_repository_arns" {
  description = "ECR repositories (ARNs) the instances may pull from besides the image's own."
  type        = list(string)
  default     = []
}

variable "container_uid" {
  description = "User id the MNEMOS image runs as (the Dockerfile's `mnemos` user): owner of the secret files."
  type        = number
  default     = 10001
}

variable "control_plane_env" {
  description = "Extra environment of the control-plane container (MNEMOS_CP_*, MNEMOS_LOG_LEVEL, ...). Plain text in the launch template: no secrets."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.control_plane_env : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k)) && !can(regex("[\n\r]", v))])
    error_message = "Keys are environment variable names and values hold no newline."
  }
}

variable "gateway_env" {
  description = "Extra environment of the gateway container (MNEMOS_GATEWAY_*, ...). Plain text in the launch template: no secrets."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.gateway_env : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k)) && !can(regex("[\n\r]", v))])
    error_message = "Keys are environment variable names and values hold no newline."
  }
}

variable "autoscaler_env" {
  description = "Extra environment of the autoscaler container. Plain text in the launch template: no secrets."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.autoscaler_env : can(regex("^[A-Za-z_][A-Za-z0-9_]*$", k)) && !can(regex("[\n\r]", v))])
    error_message = "Keys are environment variable names and values hold no newline."
  }
}

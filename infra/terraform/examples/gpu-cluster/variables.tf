variable "region" {
  description = "AWS region of everything (also provider_settings.region of both pools)."
  type        = string
  default     = "us-east-1"
}

variable "namespace" {
  description = "MNEMOS namespace (MNEMOS_NAMESPACE) of the whole deployment."
  type        = string
  default     = "mnemos"
}

variable "tags" {
  description = "Tags for every resource (the provider's default_tags). Must not set mnemos:namespace or mnemos:pool."
  type        = map(string)
  default     = { Project = "mnemos" }

  validation {
    condition     = !contains(keys(var.tags), "mnemos:pool") && !contains(keys(var.tags), "mnemos:namespace")
    error_message = "mnemos:pool and mnemos:namespace are set by the modules, on worker groups only."
  }
}

variable "vpc_id" {
  description = "Existing VPC to deploy into."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets of the VPC, ideally in three AZs, with egress (NAT gateway or VPC endpoints for ECR, S3, Secrets Manager, SSM, Auto Scaling, EC2)."
  type        = list(string)
}

variable "mnemos_image" {
  description = "MNEMOS image for the control plane, gateway and autoscaler (infra/docker/Dockerfile, default CPU build), e.g. <account>.dkr.ecr.<region>.amazonaws.com/mnemos:0.1.0."
  type        = string
}

variable "worker_image" {
  description = "GPU worker image (infra/docker/Dockerfile built with a CUDA base and EXTRAS=gpu), e.g. <account>.dkr.ecr.<region>.amazonaws.com/mnemos-worker-gpu:0.1.0."
  type        = string
}

variable "nats_auth_config_secret_arn" {
  description = "Secrets Manager secret: the nats-server authorization configuration (server.conf from `mnemos auth init`: max_control_line, operator, system_account, resolver, resolver_preload)."
  type        = string
}

variable "worker_nats_creds_secret_arn" {
  description = "Secrets Manager secret: the NATS credentials file of the GPU workers (the worker role's creds/worker.creds from `mnemos auth init`)."
  type        = string
}

variable "control_plane_nats_creds_secret_arn" {
  description = "Secrets Manager secret: the NATS credentials file of the control-plane container (creds/control-plane.creds from `mnemos auth init`)."
  type        = string
}

variable "gateway_nats_creds_secret_arn" {
  description = "Secrets Manager secret: the NATS credentials file of the gateway container (creds/gateway.creds from `mnemos auth init`)."
  type        = string
}

variable "autoscaler_nats_creds_secret_arn" {
  description = "Secrets Manager secret: the NATS credentials file of the autoscaler container (creds/autoscaler.creds from `mnemos auth init`)."
  type        = string
}

variable "gateway_api_keys_secret_arn" {
  description = "Secrets Manager secret: the gateway's API keys, a JSON object {\"<key>\": \"<tenant>\"}."
  type        = string
}

variable "gateway_ingress_cidr_blocks" {
  description = "CIDR blocks that may reach the HTTP gateway (port 8080) on the control-plane instances (e.g. a load balancer's subnets)."
  type        = list(string)
  default     = []
}

variable "monitoring_cidr_blocks" {
  description = "CIDR blocks that may reach the NATS monitoring port 8222 (e.g. the Prometheus server's)."
  type        = list(string)
  default     = []
}

variable "on_demand_instance_type" {
  description = "Instance type of the on-demand pool (one type: it has a warm pool)."
  type        = string
  default     = "g5.xlarge"
}

variable "on_demand_max_size" {
  description = "Largest size of the on-demand group (at least the pool's max_workers)."
  type        = number
  default     = 4
}

variable "warm_pool_min_size" {
  description = "Stopped, pre-initialised instances kept in the on-demand pool's warm pool."
  type        = number
  default     = 1
}

variable "spot_instance_types" {
  description = "Instance types of the spot pool, in order of preference (more types: more spot capacity pools)."
  type        = list(string)
  default     = ["g5.xlarge", "g6.xlarge", "g5.2xlarge", "g6.2xlarge"]
}

variable "spot_max_size" {
  description = "Largest size of the spot group (at least the pool's max_workers)."
  type        = number
  default     = 8
}

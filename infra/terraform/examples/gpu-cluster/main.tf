# A whole MNEMOS deployment on AWS, in an existing VPC:
#   - a 3-server NATS JetStream cluster (R3);
#   - the control plane (control plane, gateway and autoscaler on two instances);
#   - two GPU worker pools the autoscaler drives: "a10g" (on-demand, with a warm pool) and
#     "a10g-spot" (spot, several instance types, capacity rebalancing).
# After `terraform apply`, declare the pools to the autoscaler (output pool_commands).
# Each process connects to NATS as its role's user: the secrets hold the credentials files
# `mnemos auth init` writes (creds/<role>.creds), one per role.

module "nats" {
  source = "../../modules/nats-cluster"

  name                   = "${replace(var.namespace, "_", "-")}-nats"
  vpc_id                 = var.vpc_id
  subnet_ids             = var.private_subnet_ids
  auth_config_secret_arn = var.nats_auth_config_secret_arn
  monitoring_cidr_blocks = var.monitoring_cidr_blocks

  client_security_group_ids = {
    control_plane = module.control_plane.security_group_id
    a10g          = module.pool_on_demand.security_group_id
    a10g_spot     = module.pool_spot.security_group_id
  }
}

module "control_plane" {
  source = "../../modules/control-plane"

  namespace                   = var.namespace
  vpc_id                      = var.vpc_id
  subnet_ids                  = var.private_subnet_ids
  image                       = var.mnemos_image
  nats_url                    = module.nats.nats_url
  replicas                    = module.nats.replicas
  nats_security_group_ids     = { nats = module.nats.security_group_id }
  gateway_api_keys_secret_arn = var.gateway_api_keys_secret_arn
  gateway_ingress_cidr_blocks = var.gateway_ingress_cidr_blocks

  # One NATS user per role (`mnemos auth init`: creds/<role>.creds), one secret each.
  nats_creds_secret_arns = {
    control_plane = var.control_plane_nats_creds_secret_arn
    gateway       = var.gateway_nats_creds_secret_arn
    autoscaler    = var.autoscaler_nats_creds_secret_arn
  }
}

module "pool_on_demand" {
  source = "../../modules/gpu-worker-pool"

  name                    = "a10g"
  namespace               = var.namespace
  vpc_id                  = var.vpc_id
  subnet_ids              = var.private_subnet_ids
  capacity_type           = "on-demand"
  instance_types          = [var.on_demand_instance_type]
  min_size                = 0
  max_size                = var.on_demand_max_size
  worker_image            = var.worker_image
  worker_args             = ["--runtimes", "vllm,transformers"]
  worker_env              = { MNEMOS_REPLICAS = "3" }
  nats_url                = module.nats.nats_url
  nats_security_group_ids = { nats = module.nats.security_group_id }
  nats_creds_secret_arn   = var.worker_nats_creds_secret_arn

  warm_pool = {
    pool_state = "Stopped"
    min_size   = var.warm_pool_min_size
  }
}

module "pool_spot" {
  source = "../../modules/gpu-worker-pool"

  name                    = "a10g-spot"
  namespace               = var.namespace
  vpc_id                  = var.vpc_id
  subnet_ids              = var.private_subnet_ids
  capacity_type           = "spot"
  instance_types          = var.spot_instance_types
  min_size                = 0
  max_size                = var.spot_max_size
  worker_image            = var.worker_image
  worker_args             = ["--runtimes", "vllm,transformers"]
  worker_env              = { MNEMOS_REPLICAS = "3" }
  nats_url                = module.nats.nats_url
  nats_security_group_ids = { nats = module.nats.security_group_id }
  nats_creds_secret_arn   = var.worker_nats_creds_secret_arn
}

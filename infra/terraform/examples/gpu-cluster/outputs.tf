output "nats_url" {
  description = "MNEMOS_NATS_URL of the deployment."
  value       = module.nats.nats_url
}

output "control_plane_role_arn" {
  description = "The autoscaler's AWS identity (the control plane's instance role)."
  value       = module.control_plane.iam_role_arn
}

output "pools" {
  description = "For each MNEMOS pool: its Auto Scaling group and the provider_settings to give it."
  value       = {
    for m in [module.pool_on_demand, module.pool_spot] : m.pool_name => {
      group             = m.autoscaling_group_name
      provider_settings = m.provider_settings
    }
  }
}

output "pool_commands" {
  description = "Commands that declare the two pools to the autoscaler (run them with MNEMOS_NATS_URL and the operator role's credentials, MNEMOS_NATS_CREDS=creds/operator.creds from `mnemos auth init`)."
  value       = [
    for m in [module.pool_on_demand, module.pool_spot] :
    "mnemos pools set ${m.pool_name} --provider aws --runtime vllm --runtime transformers --min 0 --max ${m.pool_name == "a10g" ? var.on_demand_max_size : var.spot_max_size} --setting region=${m.provider_settings.region} --setting group=${m.provider_settings.group}"
  ]
}

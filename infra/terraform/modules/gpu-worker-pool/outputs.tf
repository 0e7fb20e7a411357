output "autoscaling_group_name" {
  description = "Name of the Auto Scaling group (provider_settings.group of the pool, if the autoscaler cannot find it by its tags)."
  value       = aws_autoscaling_group.pool.name
}

output "autoscaling_group_arn" {
  description = "ARN of the Auto Scaling group."
  value       = aws_autoscaling_group.pool.arn
}

output "launch_template_id" {
  description = "Id of the workers' launch template."
  value       = aws_launch_template.worker.id
}

output "launch_template_latest_version" {
  description = "Latest version of the launch template (the version the group launches)."
  value       = aws_launch_template.worker.latest_version
}

output "security_group_id" {
  description = "Security group of the workers (give it to the nats-cluster module's client_security_group_ids)."
  value       = aws_security_group.worker.id
}

output "iam_role_arn" {
  description = "ARN of the workers' instance role."
  value       = aws_iam_role.worker.arn
}

output "iam_role_name" {
  description = "Name of the workers' instance role (attach more policies to it here, e.g. for an S3 artifact store in another account)."
  value       = aws_iam_role.worker.name
}

output "pool_name" {
  description = "The MNEMOS pool name (value of the mnemos:pool tag)."
  value       = var.name
}

output "provider_settings" {
  description = "provider_settings for the pool's PoolSpec (provider \"aws\"): the region and the group name."
  value       = {
    region = data.aws_region.current.name
    group  = aws_autoscaling_group.pool.name
  }
}

output "autoscaling_group_name" {
  description = "Name of the control plane's Auto Scaling group."
  value       = aws_autoscaling_group.control_plane.name
}

output "launch_template_id" {
  description = "Id of the control plane's launch template."
  value       = aws_launch_template.control_plane.id
}

output "security_group_id" {
  description = "Security group of the control-plane instances (give it to the nats-cluster module's client_security_group_ids)."
  value       = aws_security_group.control_plane.id
}

output "iam_role_arn" {
  description = "ARN of the control plane's instance role (the autoscaler's AWS identity)."
  value       = aws_iam_role.control_plane.arn
}

output "iam_role_name" {
  description = "Name of the control plane's instance role."
  value       = aws_iam_role.control_plane.name
}

output "gateway_port" {
  description = "Port of the HTTP gateway on the instances (the load balancer's target port)."
  value       = var.gateway_port
}

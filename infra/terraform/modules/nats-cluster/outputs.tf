output "nats_url" {
  description = "MNEMOS_NATS_URL for clients: every server's client URL, comma-separated."
  value       = join(",", [for ip in local.route_ips : "nats://${ip}:${local.client_port}"])
}

output "client_urls" {
  description = "Client URL of each server."
  value       = [for ip in local.route_ips : "nats://${ip}:${local.client_port}"]
}

output "private_ips" {
  description = "Private IP of each server (stable: it belongs to the server's network interface)."
  value       = local.route_ips
}

output "security_group_id" {
  description = "Security group of the servers (give it to the gpu-worker-pool and control-plane modules' nats_security_group_ids)."
  value       = aws_security_group.nats.id
}

output "instance_ids" {
  description = "EC2 instance id of each server."
  value       = aws_instance.node[*].id
}

output "data_volume_ids" {
  description = "EBS volume id of each server's JetStream store."
  value       = aws_ebs_volume.data[*].id
}

output "server_names" {
  description = "nats-server server_name of each server."
  value       = [for i in range(var.node_count) : "${var.name}-${i + 1}"]
}

output "replicas" {
  description = "MNEMOS_REPLICAS to use with this cluster."
  value       = 3
}

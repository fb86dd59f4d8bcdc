output "autoscaling_group_name" {
  description = "Name of the agents' autoscaling group."
  value       = aws_autoscaling_group.agents.name
}

output "lifecycle_hook_name" {
  description = "Termination hook the agents complete themselves."
  value       = local.hook_name
}

output "instance_role_arn" {
  description = "The agents' instance role."
  value       = aws_iam_role.agent.arn
}

output "security_group_id" {
  description = "The agents' security group (no inbound rule)."
  value       = aws_security_group.agent.id
}

output "oidc_provider_arn" {
  description = "ARN of the IAM OIDC provider for the control plane's issuer."
  value       = aws_iam_openid_connect_provider.outpost.arn
}

output "role_arns" {
  description = "Job role ARNs by name (put them, or a glob, in the agents' `[aws] allowed_roles`)."
  value       = { for k, r in aws_iam_role.job : k => r.arn }
}

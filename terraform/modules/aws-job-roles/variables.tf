variable "issuer_url" {
  description = "The control plane's OIDC issuer (`outpost server --oidc-issuer`), https://."
  type        = string
}

variable "audience" {
  description = "Audience of the per-job web-identity tokens (`--oidc-audience`)."
  type        = string
  default     = "sts.amazonaws.com"
}

variable "thumbprints" {
  description = "TLS certificate thumbprints of the issuer's host (IAM ignores them for well-known CAs)."
  type        = list(string)
  default     = []
}

variable "roles" {
  description = <<-EOT
    Job roles by name. `subjects`: token subjects allowed to assume the role
    (`job:*` for every job of this control plane; narrower patterns are
    better). `policy_arns`: managed policies attached. `max_session_seconds`:
    longest session (the agent refreshes before expiry).
  EOT
  type = map(object({
    subjects            = list(string)
    policy_arns         = list(string)
    max_session_seconds = optional(number, 3600)
  }))
}

variable "role_prefix" {
  description = "Prefix of every role name (agents' `[aws] allowed_roles` can glob on it)."
  type        = string
  default     = "outpost-"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

variable "name" {
  description = "Name of the pool; prefixes every resource."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the agents."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets the group spreads over (no public IPs are assigned)."
  type        = list(string)
}

variable "ami_id" {
  description = "AMI with Docker, the AWS CLI and outpost-agent installed (see systemd/install.sh)."
  type        = string
}

variable "instance_type" {
  description = "Instance type of the agents."
  type        = string
  default     = "m6i.large"
}

variable "min_size" {
  description = "Fewest agents."
  type        = number
  default     = 1
}

variable "max_size" {
  description = "Most agents."
  type        = number
  default     = 10
}

variable "root_volume_gb" {
  description = "Size of the encrypted root volume (job workspaces live there)."
  type        = number
  default     = 50
}

variable "kms_key_arn" {
  description = "KMS key for the root volume (null: the account's default EBS key)."
  type        = string
  default     = null
}

variable "control_plane_url" {
  description = "https:// URL of the Outpost control plane."
  type        = string
}

variable "control_plane_replicas" {
  description = "https:// URLs of other replicas of the same control plane, tried in turn after control_plane_url."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for u in var.control_plane_replicas : can(regex("^https://", u))])
    error_message = "Every replica URL must start with https://."
  }
}

variable "control_plane_cidrs" {
  description = "Where the agents may connect to (control plane, VPC endpoints for STS/S3/Secrets Manager/Auto Scaling)."
  type        = list(string)
}

variable "control_plane_port" {
  description = "TCP port of the control plane."
  type        = number
  default     = 7443
}

variable "bootstrap_secret_arn" {
  description = "Secrets Manager secret holding the agents' enrolment material (JSON: ca, token), read once at boot; token from `outpost enroll create --pool NAME --uses N --ttl T` (rotate it before it runs out)."
  type        = string
}

variable "labels" {
  description = "Agent labels jobs select on."
  type        = map(string)
  default     = {}
}

variable "capacity" {
  description = "Jobs per agent."
  type        = number
  default     = 2
}

variable "drain_grace_seconds" {
  description = "How long running jobs may take to finish when an instance is terminated (the hook's timeout follows)."
  type        = number
  default     = 3600
}

variable "queue_depth_target" {
  description = "Queued jobs per agent the scaling policy aims for (metric Outpost/QueueDepth published from the control plane)."
  type        = number
  default     = 1
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = {}
}

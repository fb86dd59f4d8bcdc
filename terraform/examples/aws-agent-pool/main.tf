# An autoscaled pool of Outpost agents in two private subnets.

provider "aws" {
  region = "eu-west-1"
}

module "pool" {
  source                 = "../../modules/aws-agent-pool"
  name                   = "outpost-terraform"
  vpc_id                 = "vpc-0123456789abcdef0"
  subnet_ids             = ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]
  ami_id                 = "ami-0123456789abcdef0"
  control_plane_url      = "https://outpost.internal:7443"
  control_plane_replicas = ["https://outpost-b.internal:7443"]
  control_plane_cidrs    = ["10.0.0.0/16"]
  bootstrap_secret_arn   = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:outpost-agent-bootstrap"
  labels                 = { pool = "terraform" }
  min_size               = 1
  max_size               = 6
}

output "autoscaling_group_name" {
  value = module.pool.autoscaling_group_name
}

# Job roles for an Outpost control plane whose issuer is hosted at
# https://oidc.outpost.example (the output of `outpost oidc publish`).

provider "aws" {
  region = "eu-west-1"
}

module "job_roles" {
  source     = "../../modules/aws-job-roles"
  issuer_url = "https://oidc.outpost.example"
  roles = {
    "terraform-network" = {
      subjects    = ["job:*"]
      policy_arns = ["arn:aws:iam::aws:policy/job-function/NetworkAdministrator"]
    }
  }
}

output "role_arns" {
  value = module.job_roles.role_arns
}

# Demo job for the outpost runner: only the hashicorp/null provider, which the
# runner image ships in a local filesystem mirror (no network needed).
terraform {
  required_version = ">= 1.0"
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "~> 2.1"
    }
  }
}

variable "greeting" {
  type    = string
  default = "hello from outpost"
}

resource "null_resource" "first" {
  triggers = {
    greeting = var.greeting
  }

  provisioner "local-exec" {
    command = "echo \"first: ${self.triggers.greeting}\""
  }
}

resource "null_resource" "second" {
  triggers = {
    after = null_resource.first.id
  }

  provisioner "local-exec" {
    command = "echo \"second: runs after first (${null_resource.first.id}) on $(uname -m)\""
  }
}

output "resource_ids" {
  value = [null_resource.first.id, null_resource.second.id]
}

# An autoscaled pool of Outpost agents. The agent completes the termination
# lifecycle hook itself: it watches its target lifecycle state and the spot
# interruption notice (IMDSv2), drains, heartbeats the hook while jobs
# finish, then completes it.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  hook_name = "${var.name}-drain"
  asg_arn   = "arn:${data.aws_partition.current.partition}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${var.name}"
  # The hook outlives the drain: drain grace + stop grace + reporting.
  hook_timeout = min(var.drain_grace_seconds + 120, 7200)
}

resource "aws_security_group" "agent" {
  name        = "${var.name}-agent"
  description = "Outpost agents: no inbound traffic, outbound to the control plane and endpoints only"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_vpc_security_group_egress_rule" "control_plane" {
  for_each          = toset(var.control_plane_cidrs)
  security_group_id = aws_security_group.agent.id
  description       = "Outpost control plane (mTLS)"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = var.control_plane_port
  to_port           = var.control_plane_port
}

resource "aws_vpc_security_group_egress_rule" "https" {
  for_each          = toset(var.control_plane_cidrs)
  security_group_id = aws_security_group.agent.id
  description       = "VPC endpoints (STS, S3, Secrets Manager, Auto Scaling)"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "agent" {
  name               = "${var.name}-agent"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = var.tags
}

# Least privilege: the hook of its own group, its own bootstrap secret.
data "aws_iam_policy_document" "agent" {
  statement {
    sid       = "CompleteOwnLifecycleHook"
    actions   = ["autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat"]
    resources = [local.asg_arn]
  }
  statement {
    sid       = "ReadBootstrapSecretOnce"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.bootstrap_secret_arn]
  }
}

resource "aws_iam_role_policy" "agent" {
  name   = "${var.name}-agent"
  role   = aws_iam_role.agent.id
  policy = data.aws_iam_policy_document.agent.json
}

resource "aws_iam_instance_profile" "agent" {
  name = "${var.name}-agent"
  role = aws_iam_role.agent.name
  tags = var.tags
}

resource "aws_launch_template" "agent" {
  name_prefix   = "${var.name}-"
  image_id      = var.ami_id
  instance_type = var.instance_type
  ebs_optimized = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.agent.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.agent.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.root_volume_gb
      volume_type           = "gp3"
      encrypted             = true
      kms_key_id            = var.kms_key_arn
      delete_on_termination = true
    }
  }

  user_data = base64encode(templatefile("${path.module}/user-data.sh.tftpl", {
    bootstrap_secret_arn = var.bootstrap_secret_arn
    region               = data.aws_region.current.name
    agent_toml = templatefile("${path.module}/agent.toml.tftpl", {
      server         = var.control_plane_url
      servers        = var.control_plane_replicas
      capacity       = var.capacity
      drain_grace    = var.drain_grace_seconds
      labels         = var.labels
      group_name     = var.name
      hook_name      = local.hook_name
      region         = data.aws_region.current.name
      heartbeat_secs = 60
    })
  }))

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-agent" })
  }

  tags = var.tags
}

resource "aws_autoscaling_group" "agents" {
  name                      = var.name
  min_size                  = var.min_size
  max_size                  = var.max_size
  vpc_zone_identifier       = var.subnet_ids
  health_check_type         = "EC2"
  health_check_grace_period = 300
  default_instance_warmup   = 120

  launch_template {
    id      = aws_launch_template.agent.id
    version = aws_launch_template.agent.latest_version
  }

  # Registered with the group, so no instance ever starts without it.
  initial_lifecycle_hook {
    name                 = local.hook_name
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = local.hook_timeout
    default_result       = "CONTINUE"
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = merge(var.tags, { Name = "${var.name}-agent" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    ignore_changes = [desired_capacity]
  }
}

# Scale on the control plane's queue depth for this pool (outpost_queue_depth
# from the control plane's /metrics, published to CloudWatch as
# Outpost/QueueDepth with dimension Pool).
resource "aws_autoscaling_policy" "queue_depth" {
  name                   = "${var.name}-queue-depth"
  autoscaling_group_name = aws_autoscaling_group.agents.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    target_value = var.queue_depth_target
    customized_metric_specification {
      metric_name = "QueueDepth"
      namespace   = "Outpost"
      statistic   = "Average"
      metric_dimension {
        name  = "Pool"
        value = var.name
      }
    }
  }
}

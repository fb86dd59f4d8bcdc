# IAM roles for Outpost jobs: an OIDC provider for the control plane's
# issuer, and roles that trust only its tokens (`sub` and `aud` claims),
# require the `outpost-job` session tag and the job id as SourceIdentity.

locals {
  issuer_host = trimprefix(var.issuer_url, "https://")
}

resource "aws_iam_openid_connect_provider" "outpost" {
  url             = var.issuer_url
  client_id_list  = [var.audience]
  thumbprint_list = var.thumbprints
  tags            = var.tags
}

data "aws_iam_policy_document" "trust" {
  for_each = var.roles

  statement {
    sid     = "OutpostJobs"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.outpost.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.issuer_host}:aud"
      values   = [var.audience]
    }
    condition {
      test     = "StringLike"
      variable = "${local.issuer_host}:sub"
      values   = each.value.subjects
    }
  }

  statement {
    sid     = "OutpostJobSessionTagsAndSourceIdentity"
    actions = ["sts:TagSession", "sts:SetSourceIdentity"]
    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.outpost.arn]
    }
    condition {
      test     = "StringLike"
      variable = "aws:RequestTag/outpost-job"
      values   = ["*"]
    }
  }
}

resource "aws_iam_role" "job" {
  for_each             = var.roles
  name                 = "${var.role_prefix}${each.key}"
  assume_role_policy   = data.aws_iam_policy_document.trust[each.key].json
  max_session_duration = each.value.max_session_seconds
  tags                 = var.tags
}

resource "aws_iam_role_policy_attachment" "job" {
  for_each = {
    for pair in flatten([
      for role, cfg in var.roles : [for arn in cfg.policy_arns : { role = role, arn = arn }]
    ]) : "${pair.role} ${pair.arn}" => pair
  }
  role       = aws_iam_role.job[each.value.role].name
  policy_arn = each.value.arn
}

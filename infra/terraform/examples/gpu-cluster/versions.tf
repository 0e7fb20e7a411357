terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.40"
    }
  }
}

provider "aws" {
  region = var.region

  # Never put mnemos:namespace or mnemos:pool here: default tags land on every resource,
  # and the control plane's role may change any group tagged with its namespace.
  default_tags {
    tags = var.tags
  }
}

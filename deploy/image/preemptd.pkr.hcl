# Packer template: a GPU machine image with preemptd installed and enabled,
# for AWS (amazon-ebs) and GCP (googlecompute). Build the package first
# (`make package`), then:  packer build -var deb=dist/preemptd_<v>_amd64.deb deploy/image
packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
    googlecompute = {
      source  = "github.com/hashicorp/googlecompute"
      version = ">= 1.1.0"
    }
  }
}

variable "deb" {
  type        = string
  description = "Path to the preemptd .deb built by `make package`."
}

variable "config" {
  type    = string
  default = "deploy/package/preemptd.yaml"
}

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "gcp_project" {
  type    = string
  default = ""
}

source "amazon-ebs" "gpu" {
  region        = var.aws_region
  instance_type = "g5.xlarge"
  ssh_username  = "ubuntu"
  ami_name      = "preemptd-gpu-{{timestamp}}"
  source_ami_filter {
    filters = {
      name                = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)*"
      virtualization-type = "hvm"
    }
    owners      = ["amazon"]
    most_recent = true
  }
  # Containers on the instance reach IMDSv2 only with a hop limit of 2.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 2
  }
}

source "googlecompute" "gpu" {
  project_id          = var.gcp_project
  zone                = "us-central1-a"
  machine_type        = "g2-standard-4"
  source_image_family = "common-cu124-ubuntu-2204"
  source_image_project_id = ["deeplearning-platform-release"]
  ssh_username        = "packer"
  image_name          = "preemptd-gpu-{{timestamp}}"
  on_host_maintenance = "TERMINATE"
}

build {
  sources = ["source.amazon-ebs.gpu", "source.googlecompute.gpu"]

  provisioner "file" {
    source      = var.deb
    destination = "/tmp/preemptd.deb"
  }
  provisioner "file" {
    source      = var.config
    destination = "/tmp/preemptd.yaml"
  }
  provisioner "shell" {
    inline = [
      "sudo dpkg -i /tmp/preemptd.deb",
      "sudo install -m 0644 /tmp/preemptd.yaml /etc/preemptd/preemptd.yaml",
      "sudo systemctl enable preemptd.service",
      "/usr/bin/preemptd version",
    ]
  }
}

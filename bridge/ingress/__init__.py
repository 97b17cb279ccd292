"""The HTTP ingress: verifies edrone's webhooks and hands them durably to RabbitMQ."""

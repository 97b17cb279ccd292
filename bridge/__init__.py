"""edrone-bridge: two-way subscription-status sync between edrone and a shop platform,
over RabbitMQ and PostgreSQL."""

"""Operations tools: ``status`` (is the deployment healthy?), ``dlq`` (list, show, replay and
purge dead-lettered messages) and ``history`` (why the bridge decided as it did)."""

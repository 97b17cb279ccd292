"""Helpers the tests share: one home for each (apps, vectors, cli, consumers, processes, proxy,
shop tables, webhooks)."""

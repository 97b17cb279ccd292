"""The service URLs as a cluster gives them: several brokers, libpq's multi-host form."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError

from bridge.amqp import quorum_group_size
from bridge.broker import broker_address, node_order
from bridge.config import Settings
from bridge.db import close_pool, create_pool
from bridge.service_urls import amqp_urls, database_address, database_hosts
from tests.support.cli import closed_port

CLUSTER = "amqp://u:p1@rabbit-1:5672/shop, amqp://v:p2@rabbit-2/shop,amqp://u:p1@rabbit-3:5673/shop"


class TestBrokers:
    def test_a_list_is_split_in_order_each_with_its_own_login(self):
        assert amqp_urls(CLUSTER) == [
            "amqp://u:p1@rabbit-1:5672/shop",
            "amqp://v:p2@rabbit-2/shop",
            "amqp://u:p1@rabbit-3:5673/shop",
        ]

    def test_one_url_is_a_list_of_one(self):
        assert amqp_urls("amqp://guest:guest@localhost:5672/") == [
            "amqp://guest:guest@localhost:5672/"
        ]

    @pytest.mark.parametrize(
        "value",
        ["", " , ", "amqp://u:hunter2@rabbit-1/,http://u:hunter2@rabbit-2/", "amqp://a/,rabbit-2"],
    )
    def test_a_list_with_anything_but_amqp_urls_is_refused_without_its_password(self, value):
        with pytest.raises(ValidationError) as refused:
            Settings(amqp_url=value)
        # What the start shows (pydantic's own text also repeats the input).
        message = refused.value.errors()[0]["msg"]
        assert "expected a URL like amqp://" in message and "hunter2" not in message

    def test_messages_name_every_node_without_logins(self):
        assert broker_address(CLUSTER) == "rabbit-1:5672,rabbit-2:5672,rabbit-3:5673 vhost shop"

    def test_each_process_shuffles_the_nodes_so_that_replicas_spread(self):
        urls = amqp_urls(CLUSTER)
        firsts = {node_order(urls)[0].host for _ in range(200)}
        assert firsts == {"rabbit-1", "rabbit-2", "rabbit-3"}
        assert sorted(str(u) for u in node_order(urls)) == sorted(urls)


class TestQuorumGroupSize:
    @pytest.mark.parametrize(("nodes", "size"), [(1, None), (2, 2), (3, 3), (4, 3), (5, 5), (7, 5)])
    def test_default_follows_the_number_of_nodes_up_to_3_or_5(self, nodes, size):
        urls = ",".join(f"amqp://guest:guest@rabbit-{n}/" for n in range(nodes))
        assert quorum_group_size(Settings(amqp_url=urls)) == size

    def test_the_setting_wins(self):
        settings = Settings(amqp_url=CLUSTER, amqp_quorum_group_size=2)
        assert quorum_group_size(settings) == 2
        assert quorum_group_size(Settings(amqp_quorum_group_size=1)) == 1

    def test_zero_replicas_is_refused(self):
        with pytest.raises(ValidationError):
            Settings(amqp_quorum_group_size=0)


class TestDatabase:
    def test_libpq_multi_host_form(self):
        url = (
            "postgresql://bridge:pw@pg-1:5432,pg-2:5433,[::1]/shop?target_session_attrs=read-write"
        )
        assert database_hosts(url) == [("pg-1", 5432), ("pg-2", 5433), ("::1", 5432)]
        assert database_address(url) == "pg-1:5432,pg-2:5433,::1:5432/shop"
        assert Settings(database_url=url).database_url.get_secret_value() == url

    def test_one_host_and_the_local_socket(self):
        assert database_address("postgresql://postgres@localhost/postgres") == (
            "localhost:5432/postgres"
        )
        assert database_hosts("postgresql:///shop") == [(None, 5432)]
        assert database_address("postgres:///shop") == "local socket:5432/shop"

    @pytest.mark.parametrize(
        "value",
        [
            "mysql://u:hunter2@db/shop",
            "postgresql://u:hunter2@pg-1:54x2,pg-2/shop",
            "postgresql://u:hunter2@pg-1,,pg-2/shop",
            "postgresql://u:hunter2@pg-1:70000/shop",
        ],
    )
    def test_anything_else_is_refused_without_its_password(self, value):
        with pytest.raises(ValidationError) as refused:
            Settings(database_url=value)
        message = refused.value.errors()[0]["msg"]
        assert "expected a URL like postgresql://" in message and "hunter2" not in message


async def test_a_pool_on_the_multi_host_form_takes_the_host_that_answers(make_settings):
    """The first host has nothing listening: asyncpg goes on to the next, the primary."""
    real = urlsplit(make_settings().database_url.get_secret_value())
    hosts = f"127.0.0.1:{closed_port()},{real.hostname}:{real.port or 5432}"
    multi = f"postgresql://{real.username}@{hosts}"
    settings = make_settings(database_url=f"{multi}{real.path}?target_session_attrs=read-write")
    pool = await create_pool(settings, command_timeout_s=10)
    try:
        assert await pool.fetchval("SELECT NOT pg_is_in_recovery()") is True
        assert await pool.fetchval("SELECT current_database()") == real.path.lstrip("/")
    finally:
        await close_pool(pool, 10)

"""A Magento-like and a PrestaShop-like shop table, and their targets as docs/shop-tables.md
shows them."""

from __future__ import annotations

MAGENTO_TABLE = """
CREATE TABLE newsletter_subscriber (
    subscriber_id     serial PRIMARY KEY,
    store_id          smallint NOT NULL DEFAULT 0,
    subscriber_email  varchar(150),
    subscriber_status integer NOT NULL DEFAULT 0,
    change_status_at  timestamp
)"""
MAGENTO_TARGET = {
    "table": "newsletter_subscriber",
    "address_column": "subscriber_email",
    "email_status_column": "subscriber_status",
    "email_status_values": {"subscribed": 1, "unsubscribed": 3},
    "set_now": ["change_status_at"],
}
PRESTASHOP_TABLE = """
CREATE TABLE ps_customer (
    id_customer serial PRIMARY KEY,
    id_shop     integer NOT NULL,
    email       varchar(255) NOT NULL,
    newsletter  boolean NOT NULL DEFAULT false,
    date_upd    timestamp NOT NULL
)"""
PRESTASHOP_TARGET = {
    "table": "ps_customer",
    "address_column": "email",
    "email_status_column": "newsletter",
    # PrestaShop's 0/1 flag, here in a boolean column: 1 and 0 are cast to true and false.
    "email_status_values": {"subscribed": 1, "unsubscribed": 0},
    "set_now": ["date_upd"],
}


async def magento(db):
    await db.execute(MAGENTO_TABLE)
    await db.execute(
        "INSERT INTO newsletter_subscriber (subscriber_email, subscriber_status) "
        "VALUES ('jan@example.com', 1), ('anna@example.com', 3), ('ewa@example.com', 1)"
    )


async def magento_rows(db):
    rows = await db.fetch(
        "SELECT subscriber_email, subscriber_status, change_status_at IS NOT NULL AS changed "
        "FROM newsletter_subscriber ORDER BY subscriber_id"
    )
    return [tuple(row) for row in rows]

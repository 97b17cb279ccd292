-- The ages of the messages the bridge parks in a dead-letter queue or a retry tier, kept here
-- because RabbitMQ 3.10 cannot tell them without disturbing the queue: its management API has
-- no head timestamp for quorum queues, and a peek (get, then requeue) moves the head to the
-- back. `status` and /metrics read the oldest age from here (docs/operations.md).
--
-- Written by the consumer runtime once a copy is confirmed; removed by the runtime when a
-- retry tier hands a message back, by `dlq replay` and `dlq purge`, and by the consumers'
-- monitor for a queue it found empty. Soft state: a row may be missing (the broker
-- dead-lettered a message itself, or the write failed), never worth a message's delay.

CREATE TABLE parked_messages (
    queue       text        NOT NULL,
    message_id  text        NOT NULL,
    -- What the message's age counts from: its dead-lettering (a DLQ), its first failure (a
    -- retry tier).
    since       timestamptz NOT NULL,
    -- Copies of this id in this queue (a redelivered batch may be copied twice).
    copies      integer     NOT NULL DEFAULT 1 CHECK (copies > 0),
    -- When the row was last written (the database's clock), for forgetting an emptied queue
    -- without forgetting what was parked while it was found empty.
    parked_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, message_id)
);

CREATE INDEX parked_messages_oldest ON parked_messages (queue, since);

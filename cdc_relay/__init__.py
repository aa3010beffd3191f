"""cdc-relay: the transactional outbox, streamed from PostgreSQL's WAL to RabbitMQ.

The pure core (lsn, pgoutput, replication, outbox, messages, checkpoint) never imports
psycopg, pika or opentelemetry so it can be tested byte-for-byte without servers.
"""

__version__ = "0.1.0"

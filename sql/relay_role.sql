-- The least-privilege role for cdc-relay: run this as a superuser (or the outbox's owner for
-- the publication), after replacing the password. The suite runs exactly this file and then
-- `cdc-relay init` and `cdc-relay run` as the role (tests/integration/test_tls.py).
--
-- The relay needs: LOGIN and REPLICATION (to create its slot and stream from it), and SELECT
-- on the outbox (start-up checks, and the rows `init --backfill`, `recover` and `replay` read).
-- It never writes to the outbox. It owns nothing, so it cannot alter the publication it reads;
-- it then cannot record its slot in the publication's comment (it warns), and `init
-- --backfill` / `recover` must run as the publication's owner.
CREATE ROLE cdc_relay WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO cdc_relay;
GRANT SELECT ON public.outbox TO cdc_relay;

-- CREATE PUBLICATION needs ownership of the table: the table's owner creates it, once.
CREATE PUBLICATION cdc_relay FOR TABLE public.outbox WITH (publish = 'insert, truncate');

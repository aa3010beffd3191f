-- A least-privilege role for cdc-relay (run as a superuser; replace the password).
-- The relay needs REPLICATION to stream, SELECT on the outbox for the start-up checks,
-- and ownership of the publication only if it should create it (`cdc-relay init`).
CREATE ROLE cdc_relay WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO cdc_relay;
GRANT SELECT ON public.outbox TO cdc_relay;
-- The application role writes events; the relay never writes to the outbox.
-- CREATE PUBLICATION needs ownership of the table, so create it once as the table owner:
--   CREATE PUBLICATION cdc_relay FOR TABLE public.outbox WITH (publish = 'insert, truncate');
-- and let `cdc-relay init` (run as cdc_relay) create only the slot.

-- Least-privilege roles for Marco (issue 17), run once by the postgres image when it initialises its data
-- volume (docker-compose.yml mounts this file into /docker-entrypoint-initdb.d/). It runs as the owner
-- ($POSTGRES_USER), who keeps the schema: the `migrate` service connects as the owner; nothing else does.
--
--   marco_app       workers, the scheduler and `marco` commands: read and write rows, no DDL, no TRUNCATE;
--   marco_explorer  `marco ui`: read only (every session starts read-only as well).
--
-- Passwords come from the postgres container's environment (MARCO_APP_DB_PASSWORD,
-- MARCO_EXPLORER_DB_PASSWORD) through psql's \getenv and are quoted by psql (:'var'): never in a command
-- line or in this file. An existing volume is not re-initialised: run this file once by hand there
-- (docs/operations.md, "Database roles").
\set ON_ERROR_STOP on
\getenv app_password MARCO_APP_DB_PASSWORD
\getenv explorer_password MARCO_EXPLORER_DB_PASSWORD
\if :{?app_password}
\else
  \echo 'MARCO_APP_DB_PASSWORD is not set in the postgres container'
  SELECT 1/0;
\endif
\if :{?explorer_password}
\else
  \echo 'MARCO_EXPLORER_DB_PASSWORD is not set in the postgres container'
  SELECT 1/0;
\endif

SELECT current_database() AS db \gset

CREATE ROLE marco_app LOGIN PASSWORD :'app_password';
CREATE ROLE marco_explorer LOGIN PASSWORD :'explorer_password';
ALTER ROLE marco_explorer SET default_transaction_read_only = on;

REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"db" TO marco_app, marco_explorer;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO marco_app, marco_explorer;

-- the tables that exist now, and every table the owner's migrations create later
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO marco_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO marco_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO marco_explorer;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO marco_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO marco_app;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO marco_explorer;

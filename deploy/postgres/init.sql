-- Runs once, when the postgres service creates its data volume: the MLflow store is the
-- POSTGRES_DB ("mlflow"); the prediction log of the api gets its own database.
CREATE DATABASE predictions OWNER visionops;

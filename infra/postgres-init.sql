-- One database per server, both owned by the compose file's POSTGRES_USER (runs once, on an empty volume).
CREATE DATABASE mlflow;
CREATE DATABASE prefect;

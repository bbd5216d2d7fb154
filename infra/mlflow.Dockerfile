# MLflow tracking server of infra/docker-compose.yml: the release the project pins (pyproject: mlflow>=3),
# with the Postgres driver and boto3 for MinIO / S3 artifacts.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary boto3

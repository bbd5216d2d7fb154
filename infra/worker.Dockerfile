# Prefect process worker of infra/docker-compose.yml: the project installed as `make install` does (same
# constraints), so flow runs import flux2lora, flows/ and tasks/. The checkout itself is mounted at /project.
# For GPU training, start FROM an image with CUDA and a matching torch instead (constraints.txt pins the CPU build).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY src ./src
COPY flows ./flows
COPY tasks ./tasks
RUN pip install --no-cache-dir -c constraints.txt .
WORKDIR /project

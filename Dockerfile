# sasrec-service: one image for training, export and serving.
#   docker build -t sasrec-service .                                  (CPU)
#   docker build --build-arg TF_EXTRA=and-cuda -t sasrec-service:gpu .  (CUDA wheels for the GPU profile)
FROM python:3.11-slim

ARG TF_EXTRA=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KERAS_BACKEND=tensorflow \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /app
COPY . /app
# /models, /runs, /datasets: mount points of named volumes, which take the owner of these folders.
RUN pip install /app \
    && if [ -n "$TF_EXTRA" ]; then pip install "tensorflow[$TF_EXTRA]>=2.21,<2.22"; fi \
    && useradd --create-home --uid 10001 app \
    && mkdir -p /models /runs /work /datasets \
    && chown app:app /models /runs /work /datasets

USER app
# gRPC and Prometheus metrics.
EXPOSE 8500 9090
CMD ["sasrec", "--help"]

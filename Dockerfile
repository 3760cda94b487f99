# guardproxy, CPU image. Build: docker build -t guardproxy .   (GPU: Dockerfile.cuda)
# The guard model is fetched by hub id into /models (a volume) on first start, or mounted there.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models

# The CPU build of torch first: from PyPI's default index, Linux torch is a multi-GB CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY guardproxy ./guardproxy
COPY config ./config
RUN pip install . && guardproxy --help > /dev/null

RUN useradd --uid 10001 --create-home guard && mkdir -p /models && chown guard /models
USER guard
VOLUME ["/models"]
EXPOSE 8080

HEALTHCHECK --interval=10s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)" || exit 1

ENTRYPOINT ["guardproxy"]
CMD ["serve", "--config", "/app/config/guardproxy.yaml", "--host", "0.0.0.0"]

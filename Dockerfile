# guardproxy, CPU image. Build: docker build -t guardproxy .
# The guard model is fetched by hub id into /models (a volume) on first use, or mounted there.
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
RUN pip install . && guardproxy --help > /dev/null

RUN useradd --uid 10001 --create-home guard && mkdir -p /models && chown guard /models
USER guard
VOLUME ["/models"]

ENTRYPOINT ["guardproxy"]
CMD ["--help"]

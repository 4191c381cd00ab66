# gptcpu on NumPy's own OpenBLAS, kernels on numba's OpenMP layer (GNU libgomp).
#
#   make wheelhouse                       # once: the project and its dependencies as wheels
#   docker build -f docker/openblas.Dockerfile -t gptcpu:openblas .
#   docker run --rm -v "$PWD/models:/models" gptcpu:openblas generate --model /models/demo "def f(x):"
#
# WHEELS names a folder of wheels in the build context (default docker/wheelhouse): when it
# holds wheels, pip installs from it alone (--no-index: no network needed); when it is empty,
# pip installs the project from source and its dependencies from the index.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG WHEELS=docker/wheelhouse
COPY . /src
RUN python3 -m venv /opt/gptcpu \
 && if ls /src/${WHEELS}/gptcpu-*.whl >/dev/null 2>&1; then \
      /opt/gptcpu/bin/pip install --no-cache-dir --no-index --find-links /src/${WHEELS} gptcpu; \
    else \
      /opt/gptcpu/bin/pip install --no-cache-dir /src; \
    fi \
 && /opt/gptcpu/bin/pip uninstall --yes pip \
 && find /opt/gptcpu -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE}
# numba's OpenMP layer needs GNU libgomp, which the slim base does not carry; the version is
# whatever the base's Debian release ships (a pin would break at its next point release)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install --yes --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin gptcpu \
 && mkdir /models && chown gptcpu /models
COPY --from=build /opt/gptcpu /opt/gptcpu
ENV PATH=/opt/gptcpu/bin:$PATH \
    GPTCPU_BACKEND=openblas \
    GPTCPU_THREADING=openmp \
    GPTCPU_HOME=/home/gptcpu/.cache/gptcpu \
    NUMBA_CACHE_DIR=/home/gptcpu/.cache/numba \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /home/gptcpu
VOLUME /models
ENTRYPOINT ["gptcpu"]
CMD ["--help"]

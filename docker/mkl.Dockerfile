# gptcpu on MKL (libmkl_rt through ctypes): THREADING=openmp (MKL's GNU OpenMP layer, shared with
# numba's omp layer; the default) or tbb (MKL's TBB layer, shared with numba's tbb layer).
#
#   make wheelhouse
#   docker build -f docker/mkl.Dockerfile -t gptcpu:mkl .
#   docker build -f docker/mkl.Dockerfile --build-arg THREADING=tbb -t gptcpu:mkl-tbb .
#   docker run --rm -v "$PWD/models:/models" gptcpu:mkl generate --model /models/demo "def f(x):"
#
# WHEELS: as in openblas.Dockerfile (a wheelhouse for offline builds, else the index).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG WHEELS=docker/wheelhouse
COPY . /src
RUN python3 -m venv /opt/gptcpu \
 && if ls /src/${WHEELS}/gptcpu-*.whl >/dev/null 2>&1; then \
      /opt/gptcpu/bin/pip install --no-cache-dir --no-index --find-links /src/${WHEELS} "gptcpu[mkl]"; \
    else \
      /opt/gptcpu/bin/pip install --no-cache-dir "/src[mkl]"; \
    fi \
 && /opt/gptcpu/bin/pip uninstall --yes pip \
 && find /opt/gptcpu -name '__pycache__' -prune -exec rm -rf {} + \
 # unused by gptcpu (it calls cblas_sgemm through libmkl_rt with the GNU, TBB or sequential
 # layer): MKL's cluster, FFT, ILP64, vector-math and Intel-OpenMP-threaded libraries, the GPU
 # offload runtimes, static archives and debug files
 && rm -f /opt/gptcpu/lib/libmkl_blacs_* /opt/gptcpu/lib/libmkl_scalapack_* /opt/gptcpu/lib/libmkl_cdft_* \
          /opt/gptcpu/lib/libmkl_*ilp64* /opt/gptcpu/lib/libmkl_vml_* /opt/gptcpu/lib/libmkl_intel_thread* \
          /opt/gptcpu/lib/libomptarget* /opt/gptcpu/lib/libur_* /opt/gptcpu/lib/*.a /opt/gptcpu/lib/*.dbg

FROM ${BASE}
ARG THREADING=openmp
# libgomp for the OpenMP layer; unpinned: the base's Debian release decides (see openblas.Dockerfile)
# hadolint ignore=DL3008
RUN if [ "${THREADING}" = openmp ]; then \
      apt-get update \
      && apt-get install --yes --no-install-recommends libgomp1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin gptcpu \
 && mkdir /models && chown gptcpu /models
COPY --from=build /opt/gptcpu /opt/gptcpu
ENV PATH=/opt/gptcpu/bin:$PATH \
    GPTCPU_BACKEND=mkl \
    GPTCPU_THREADING=${THREADING} \
    GPTCPU_HOME=/home/gptcpu/.cache/gptcpu \
    NUMBA_CACHE_DIR=/home/gptcpu/.cache/numba \
    PYTHONDONTWRITEBYTECODE=1
USER 1000:1000
WORKDIR /home/gptcpu
VOLUME /models
ENTRYPOINT ["gptcpu"]
CMD ["--help"]

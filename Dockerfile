# StockPilot Ops: one image for every process; compose.yaml picks the command
# (`service health|usage|batch`, `hooks`, `gateway`, or the ops tooling).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/stockpilot/bin:$PATH \
    STOCKPILOT_DATA_DIR=/var/lib/stockpilot

RUN python -m venv /opt/stockpilot \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/stockpilot stockpilot \
    && install -d -o stockpilot -g stockpilot /var/lib/stockpilot

WORKDIR /app

# Dependencies first (their layer survives code changes): the runtime requirements of
# pyproject.toml at the versions pinned in requirements.lock. The lock also pins the dev
# extras (pytest, mypy, playwright…), so it constrains rather than lists what is installed.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/runtime.txt \
    && pip install --constraint requirements.lock --requirement /tmp/runtime.txt \
    && rm /tmp/runtime.txt

# Then the project itself, without dependencies (all pinned above) and without dev extras.
COPY README.md ./
COPY shared ./shared
COPY services ./services
COPY gateway ./gateway
COPY ops ./ops
RUN pip install --no-deps . && rm -rf /app/build

USER stockpilot
WORKDIR /var/lib/stockpilot
EXPOSE 8000
# Settings come from STOCKPILOT_* variables (README); processes stop cleanly on SIGTERM.
ENTRYPOINT ["stockpilot"]
CMD ["--help"]

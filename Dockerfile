FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
RUN pip install --no-cache-dir . && useradd --create-home bot && mkdir -p /app/data && chown bot /app/data
USER bot
ENV DATA_DIR=/app/data
# 3000: the Events API with --http (and its probes); 9100: probes and metrics with --metrics-port.
EXPOSE 3000 9100
CMD ["slack-gpt-bot", "run"]

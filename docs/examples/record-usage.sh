#!/bin/sh
# Records one LLM call with StockPilot Ops from any language: one HTTP POST with the ingest token.
# STOCKPILOT_URL defaults to the local gateway; STOCKPILOT_INGEST_TOKEN is the gateway's setting.
set -eu
curl --fail-with-body --silent --show-error \
  -H "Authorization: Bearer ${STOCKPILOT_INGEST_TOKEN}" -H "Content-Type: application/json" \
  "${STOCKPILOT_URL:-http://127.0.0.1:8000}/api/v1/usage/records" \
  -d "{\"request_id\":\"${1:?usage: record-usage.sh REQUEST_ID MODEL PROMPT_TOKENS COMPLETION_TOKENS}\",
       \"model\":\"${2}\",\"prompt_tokens\":${3},\"completion_tokens\":${4},
       \"status_code\":200,\"endpoint\":\"/api/v1/analysis\"}"

#!/bin/sh
# Runs a command as a StockPilot batch job from cron, in any language: takes the job's lock, reports
# the run (skipped when the lock is held), and gives the lock back. Only curl is needed.
# Usage: JOB=nightly-report cron-job.sh ./nightly-report.sh   (STOCKPILOT_URL, STOCKPILOT_INGEST_TOKEN)
# --- the five lines shown in the README ---
J=$STOCKPILOT_URL/api/v1/batch/jobs/${JOB:-nightly-report}; O="cron@$(hostname)"
p() { curl -sSf -H "Authorization: Bearer $STOCKPILOT_INGEST_TOKEN" -H 'Content-Type: application/json' -d "$2" "$J/$1"; }
T=$(p lock/acquire "{\"owner\":\"$O\",\"ttl_s\":3600}" | grep -o '"fencing_token":[0-9]*' | grep -o '[0-9]*$') || { p runs '{"status":"skipped"}'; exit 0; }
R=$(p runs '{"status":"started"}' | grep -o '"execution_id":"[^"]*"' | cut -d'"' -f4)
"$@" && S=succeeded || S=failed; p runs "{\"execution_id\":\"$R\",\"status\":\"$S\"}"; p lock/release-mine "{\"owner\":\"$O\",\"fencing_token\":$T}"

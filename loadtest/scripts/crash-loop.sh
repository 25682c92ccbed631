#!/usr/bin/env bash
# The long crash loop: the daemon under continuous socket ingest and delivery to two
# endpoints, `kill -9`ed at random moments 100 times (CRASH_KILLS to change), restarted
# each time; then every acknowledged click must have reached both endpoints. Prints
# acknowledged, delivered, lost (must be 0) and duplicates. CRASH_SEED replays a run.
set -euo pipefail
cd "$(dirname "$0")/../.."
CRASH_KILLS=${CRASH_KILLS:-100} cargo test --release --test crash_loop -- --nocapture

#!/usr/bin/env bash
# The networked deployment on one machine, in a few minutes: keys and a roster for three parties, `owner
# --listen` on 127.0.0.1 and three `party --connect` processes, one short round of the embedded model, each
# side's exit status and last lines. Everything lands in $DIR (default runs/loopback), which must not exist;
# extra arguments go to the owner (e.g. --model DIR). Run scripts/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DIR=${DIR:-runs/loopback}
PORT=${PORT:-5555}
PARTIES=(party-1 party-2 party-3)
if [ -e "$DIR" ]; then
  echo "error: $DIR exists: remove it, or choose another with DIR=..." >&2
  exit 2
fi
mkdir -p "$DIR"

owner keygen --out "$DIR/keys/owner" >/dev/null
for p in "${PARTIES[@]}"; do party keygen --name "$p" --out "$DIR/keys/$p" >/dev/null; done
# The members' public files make the roster; the owner allows exactly its members.
party roster --out "$DIR/roster.json" --members "${PARTIES[@]/#/$DIR/keys/}"

# One short round; --max-length stays at its default, so that most public examples fit for the alignment.
SMALL=(--rounds 1 --local-steps 2 --batch-size 2 --align-pre-steps 2 --align-steps 1 --eval-items 4
       --public-limit 16)
owner --listen "tcp://127.0.0.1:$PORT" --parties 3 --out "$DIR/run" --key "$DIR/keys/owner/owner.key_secret" \
      --allow "$DIR/roster.json" --progress plain "${SMALL[@]}" "$@" >"$DIR/owner.log" 2>&1 &
pids=($!)
for p in "${PARTIES[@]}"; do
  party --connect "tcp://127.0.0.1:$PORT" --data gsm8k-train --key "$DIR/keys/$p/$p.key_secret" \
        --owner-key "$DIR/keys/owner/owner.key" --roster "$DIR/roster.json" --work "$DIR/work-$p" \
        --progress plain >"$DIR/$p.log" 2>&1 &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  name=$([ "$i" = 0 ] && echo owner || echo "${PARTIES[$((i - 1))]}")
  if wait "${pids[$i]}"; then rc=0; else rc=$?; status=1; fi
  echo "--- $name: exit $rc ($DIR/$name.log)"
  tail -n 3 "$DIR/$name.log"
done
[ "$status" = 0 ] && echo "loopback run done: $DIR/run/adapfu (python -m owner.generate --adapter $DIR/run/adapfu --prompt ...)"
exit "$status"

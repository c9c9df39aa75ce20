#!/usr/bin/env bash
# Regenerates the seed corpus from the golden transcripts (tests/transcripts/*.txt):
# - corpus/message_parse/seed-<hash>: every distinct `C>` frame, one per file;
# - corpus/session/seed-<transcript>-<client>: each client's `C>` frames of one transcript,
#   one per line, after a mode byte (`E`: development, the default pair limit; see
#   fuzz_targets/session.rs), plus a few driver-command seeds.
# Only files named seed-* are kept by git; libFuzzer's own finds are ignored.
set -euo pipefail
cd "$(dirname "$0")"
transcripts=../tests/transcripts
rm -f corpus/message_parse/seed-* corpus/session/seed-*
mkdir -p corpus/message_parse corpus/session

for file in "$transcripts"/*.txt; do
  name=$(basename "$file" .txt)
  # "[LABEL ]C> FRAME": the label is optional and defaults to A.
  sed -n -E 's/^[[:space:]]*(([^[:space:]<>]+)[[:space:]]+)?C>[[:space:]]*(.*)$/\2\x1f\3/p' "$file" |
    while IFS=$'\x1f' read -r label frame; do
      label=${label:-A}
      printf '%s' "$frame" >"corpus/message_parse/seed-$(printf '%s' "$frame" | sha1sum | cut -c1-16)"
      session="corpus/session/seed-$name-$label"
      if [ -e "$session" ]; then
        printf '\n%s' "$frame" >>"$session"
      else
        printf 'E%s' "$frame" >"$session"
      fi
    done
done

# Driver commands: a held authentication with queued messages, a refused one, sent entries.
connect='["connect",5,"10:abc:tab",0,{"token":"good-10","subprotocol":1}]'
printf 'E%s\n!hold\n%s\n["ping",0]\n!ok\n!send 3 1 7\n["ping",0]' \
  '["headers",{}]' "$connect" >corpus/session/seed-cmd-held-auth
printf 'E!hold\n%s\n["sync",1,{"type":"a"},{"id":1,"time":1}]\n!fail' \
  "$connect" >corpus/session/seed-cmd-refused
printf 'E%s\n!now -5\n["sync",2,{"type":"a"},{"id":[1,2],"time":-3}]\n!send 18446744073709551615 0\n!bad oops' \
  "$connect" >corpus/session/seed-cmd-send

echo "message_parse: $(ls corpus/message_parse | wc -l) seeds, session: $(ls corpus/session | wc -l) seeds"

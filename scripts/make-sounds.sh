#!/usr/bin/env bash
# Generates the prompts in sounds/ from sounds/prompts.txt (name|text), reproducibly:
# espeak-ng (fixed voice, speed, pitch) -> sox -R (repeatable dither) -> 8 kHz mono 16-bit .wav (slin) and .ulaw.
# Installs espeak-ng and sox with apt-get when they are missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
SOUNDS=${SOUNDS:-sounds}
VOICE=${VOICE:-en-us}
SPEED=${SPEED:-150}
PITCH=${PITCH:-45}

need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "make-sounds: missing ${need[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "make-sounds: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count=0
while IFS='|' read -r name text; do
  case "$name" in ''|'#'*) continue ;; esac
  if ! [[ "$name" =~ ^[a-z0-9-]+$ ]] || [ -z "$text" ]; then
    echo "make-sounds: $SOUNDS/prompts.txt: bad line '$name|$text' (want name|text)" >&2
    exit 1
  fi
  espeak-ng -v "$VOICE" -s "$SPEED" -p "$PITCH" -w "$tmp/$name.raw.wav" "$text"
  # Resample to telephone quality; a little head/tail room; normalise to -3 dBFS.
  sox -R "$tmp/$name.raw.wav" -r 8000 -c 1 -b 16 -e signed-integer "$tmp/$name.wav" \
    norm -3 pad 0.05 0.15
  # WAV: strip any metadata chunks so the bytes only depend on the audio.
  sox -R "$tmp/$name.wav" -t wav -r 8000 -c 1 -b 16 -e signed-integer "$SOUNDS/$name.wav"
  sox -R "$tmp/$name.wav" -t ul -r 8000 -c 1 "$SOUNDS/$name.ulaw"
  count=$((count + 1))
done < "$SOUNDS/prompts.txt"
echo "make-sounds: $count prompts written to $SOUNDS/ (.wav slin 8 kHz, .ulaw)"

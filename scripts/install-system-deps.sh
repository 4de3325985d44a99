#!/usr/bin/env bash
# Install the system libraries audio capture needs; idempotent (silent when all are there).
#   libasound2    ALSA user-space library (PCM names, asoundrc, the plug/file/dsnoop plugins)
#   alsa-utils    arecord, which the monitor runs to capture a --device, and aplay -L
#   libportaudio2 PortAudio, which sounddevice loads (capture where arecord is missing)
#   libsndfile1   WAV/FLAC decoding for soundfile where its wheel does not bundle it
#   mosquitto     an MQTT broker: the tests of `monitor --mqtt` start their own on 127.0.0.1
#                 (an edge box publishes to the plant's broker and does not need it)
#   openssl       the CLI the MQTT TLS test makes its CA and broker certificate with
# libasound2-plugins is not needed: it adds PulseAudio/JACK bridges an edge box does not use.
# apt-based systems (Debian, Ubuntu, JetPack); runs as root, or through sudo otherwise.
# Usage: bash scripts/install-system-deps.sh   (scripts/setup.sh calls it; so should CI)
set -euo pipefail

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: no apt-get; install ALSA (libasound2, alsa-utils)," \
    "PortAudio and libsndfile with this system's package manager" >&2
  exit 0
fi

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Ubuntu 24.04 renamed libasound2 to libasound2t64 (the 64-bit time_t transition).
alsa_lib=libasound2
if installed libasound2t64; then
  alsa_lib=libasound2t64
fi

missing=()
for pkg in "$alsa_lib" alsa-utils libportaudio2 libsndfile1 mosquitto openssl; do
  installed "$pkg" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "install-system-deps: root or sudo is needed to install: ${missing[*]}" >&2
  exit 1
fi

echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q >&2
for i in "${!missing[@]}"; do  # a release that has only the renamed ALSA package
  if [ "${missing[$i]}" = libasound2 ] && ! apt-cache show libasound2 2>/dev/null | grep -q '^Filename:'; then
    missing[$i]=libasound2t64
  fi
done
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2

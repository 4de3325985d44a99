#!/usr/bin/env bash
# The main job end to end on the embedded synthetic default, no download needed:
# synthesize machines -> train `tiny` on the CPU -> evaluate (results table) -> the same
# clips scored by the DCASE 2020 autoencoder baseline beside MSN -> export a
# bundle (ONNX + parity check + INT8) -> monitor a recording with a faulty stretch ->
# enroll a fan the model never trained on from 3 minutes of its normal running, monitor it.
#   DEMO_DIR  where everything goes (default: demo/, removed and rebuilt on each run)
#   EPOCHS    training epochs (default: the tiny preset's)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

out=${DEMO_DIR:-demo}
rm -rf "$out"
mkdir -p "$out"
step() { printf '\n== %s\n' "$*" >&2; }

step "1/9 synthesize a data set of fans, valves and sliders"
msn-edge synth "$out/data" --seed 0

step "2/9 train the tiny preset on the CPU"
msn-edge train "$out/data" -o "$out/run" --preset tiny ${EPOCHS:+--epochs "$EPOCHS"}

step "3/9 evaluate on the test clips (normal + anomalous)"
msn-edge evaluate "$out/run" --data "$out/data"

step "4/9 side by side: MSN and the DCASE 2020 autoencoder baseline on the same clips"
python benchmarks/accuracy.py --data "$out/data" --msn-run "$out/run" --seeds 0 \
  --recipes logspec-speed --systems msn autoencoder --no-int8 --work "$out/accuracy"

step "5/9 export one bundle file: ONNX with parity check, INT8"
msn-edge export "$out/run" -o "$out/machine.msn" --int8 --eval-data "$out/data"

step "6/9 a recording of fan id_00: 60 s normal, 60 s with a bearing fault, 60 s normal"
msn-edge synth-stream "$out/stream.wav" --kind fan --id 0 --seed 0 \
  --normal 60 60 --fault-seconds 60 --fault bearing

step "7/9 monitor it: one JSON event per 10 s window, an alarm after 2 anomalous windows"
msn-edge monitor "$out/machine.msn" --input "$out/stream.wav" --group fan/id_00 \
  --alarm-after 2 --events-file "$out/events.jsonl"
msn-edge plot "$out/events.jsonl" -o "$out/timeline.png"

step "8/9 a fan the model never trained on (id_02): 3 min normal, 60 s bearing fault, 60 s normal"
msn-edge synth-stream "$out/new-fan.wav" --kind fan --id 2 --seed 0 \
  --normal 180 60 --fault-seconds 60 --fault bearing

step "9/9 listen 3 min, enroll it into a new bundle beside the old one, then monitor it"
msn-edge monitor "$out/machine.msn" --input "$out/new-fan.wav" --group fan/id_02 \
  --enroll-first 3 --alarm-after 2 --events-file "$out/events-new-fan.jsonl"
msn-edge info "$out"/machine.fan-id_02.*.msn
msn-edge plot "$out/events-new-fan.jsonl" -o "$out/timeline-new-fan.png"
printf '\nDone: results in %s/run/eval, bundle %s/machine.msn, timelines %s/timeline*.png\n' \
  "$out" "$out" "$out" >&2

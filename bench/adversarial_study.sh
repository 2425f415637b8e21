#!/bin/bash
# The adversarial study of docs/benchmarks.md: grids/adversarial.json x 2 seeds on a 6-track demo cache and on
# 25 s excerpts of Debian's asc-music MP3s (cut by stream copy: the MP3 frames are untouched), random codec.
#
#   bash bench/adversarial_study.sh [OUT]          # OUT: default runs/adversarial_study
#
# Sizes are cut to fit a 2-core CPU: d_model 128 x 2, 16-frame segments, batch 8, 1 process, 64 windows
# evaluated; 3 epochs on the demo cache, 2 on the MP3s. Each half ends with ablate.py's report in OUT/<corpus>/report.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/adversarial_study}
PY=${PYTHON:-python}
mkdir -p "$OUT/audio/asc"

[ -f "$OUT/demo_small/manifest.json" ] || $PY -c "from music_continuation.data.prepare import prepare_demo; \
prepare_demo('$OUT/demo_small', num_tracks=6, val_fraction=0.34)"

if [ ! -f "$OUT/asc/manifest.json" ]; then
  (cd "$OUT/audio" && apt-get download asc-music && dpkg -x asc-music_*.deb root)
  $PY - "$OUT/audio" <<'PY'
import sys
from pathlib import Path

import av

START, LENGTH = 60.0, 25.0
folder = Path(sys.argv[1])
for mp3 in sorted((folder / "root/usr/share/games/asc/music").glob("*.mp3")):
    with av.open(str(mp3)) as source, av.open(str(folder / "asc" / mp3.name), "w", format="mp3") as excerpt:
        stream = source.streams.audio[0]
        copy = excerpt.add_stream_from_template(stream)
        for packet in source.demux(stream):
            if packet.pts is None or packet.pts * packet.time_base < START:
                continue
            if packet.pts * packet.time_base >= START + LENGTH:
                break
            packet.stream = copy
            packet.pts = packet.dts = packet.pts - int(START / packet.time_base)
            excerpt.mux(packet)
PY
  $PY prepare_data.py --audio_dir "$OUT/audio/asc" --out_dir "$OUT/asc" --encodec_weights random --val_fraction 0.34
fi

SIZES="--grid grids/adversarial.json --seeds 2 --d_model 128 --num_layers 2 --num_heads 4 --dropout 0.0
       --segment_frames 16 --batch_size 8 --lr 1e-3 --warmup_steps 10 --nproc 1 --num_workers 0 --log_audio_every 0
       --max_windows 64"
# shellcheck disable=SC2086
$PY ablate.py $SIZES --epochs 3 --data_dir "$OUT/demo_small" --out_dir "$OUT/runs_demo_small"
# shellcheck disable=SC2086
$PY ablate.py $SIZES --epochs 2 --data_dir "$OUT/asc" --out_dir "$OUT/runs_asc"
